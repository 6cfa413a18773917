"""Fixtures of the reliability tests: guards that keep every case away from Ray, the network and training.

A case that gets past validation trips a guard (RayStarted) instead of starting real work."""

from __future__ import annotations

import pytest

from ._support import RayStarted


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray, screening, training or downloading a built-in data set raises RayStarted."""
    import ray

    from orchestrator import data, pipeline

    def refuse(*args, **kwargs):
        raise RayStarted("validation passed and the run went on to start Ray / screen / train / download")

    monkeypatch.setattr(ray, "init", refuse)  # the one guard that cannot be renamed away
    monkeypatch.setattr(data, "fetch_packaged_file", refuse)
    for name in ("init_ray", "module_scores", "_module_scores", "run_training"):  # the pipeline's stages, where present
        if hasattr(pipeline, name):
            monkeypatch.setattr(pipeline, name, refuse)
    return RayStarted


from ._hostile_run import hostile_run  # noqa: E402,F401  (a session fixture: one real run for several files)
