"""Starting the embedded Ray on a loaded machine: Ray's own 60 s dashboard deadline is raised, not lowered."""

import ray._private.services as services

from orchestrator import pipeline


def test_dashboard_start_deadline_is_raised_where_ray_reads_it(monkeypatch):
    monkeypatch.setattr(services.ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 60)  # Ray's default
    pipeline._allow_a_slow_dashboard_start()
    assert services.ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == pipeline.DASHBOARD_START_S


def test_a_longer_deadline_set_by_the_user_stays(monkeypatch):
    monkeypatch.setattr(services.ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 900)  # RAY_DASHBOARD_STARTUP_TIMEOUT_S=900
    pipeline._allow_a_slow_dashboard_start()
    assert services.ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == 900
