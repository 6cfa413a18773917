"""The `lora-search` command. Bad input prints one line naming the field and the fix, and exits 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console

from orchestrator.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Search where LoRA adapters go and how much rank each gets, under a parameter budget.")
console = Console()


@app.command()
def run(config: Path = typer.Argument(..., help="search space YAML, e.g. search_spaces/quickstart.yaml"),
        overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. train.epochs=2"),
        resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of the same name"),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")):
    """Screen candidates with zero-cost proxies, train the survivors and baselines, write the report."""
    from orchestrator import pipeline, report
    from orchestrator.config import load_config

    cfg = load_config(config, overrides or [])
    table = pipeline.run(cfg, resume=resume, address=address)
    report.print_summary(table, report.read_run_json(cfg.run_dir)["task"]["majority_rate"], console)
    console.print(f"Results: {cfg.run_dir}/ (report.md, report.csv, report.parquet, screen.csv, study.db, adapters/)")


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory, e.g. results/quickstart")):
    """Print the summary of a finished run from its stored report."""
    from orchestrator import report

    table = report.load(run_dir)
    report.print_summary(table, report.read_run_json(run_dir)["task"]["majority_rate"], console)


@app.command()
def modules(model: str = typer.Option("minilm-l6", help="packaged model name or local Hugging Face directory")):
    """List the modules an adapter can go on, with the parameters one unit of rank costs there."""
    from orchestrator.models import adaptable_modules, load_model

    for module in adaptable_modules(load_model(model, num_labels=2)):
        console.print(f"{module.short:<28} {module.name:<50} {module.params_per_rank:>6} params/rank")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:  # usage errors: unknown option, missing argument
        err.show()
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
