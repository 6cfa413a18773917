"""lora-search: find where LoRA adapters go and how much rank each gets, under a parameter budget, on Ray."""

__version__ = "0.1.0"
