"""Starting Ray: the 60 s dashboard deadline is raised, not lowered, and Ray's processes get the runtime env."""

import os

import pytest
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


def test_an_unreachable_address_is_one_line_before_ray_init(monkeypatch):
    """ray.init retries an address nobody listens on for minutes, silently; the run had written run.json by then."""
    import socket

    import ray

    from orchestrator.errors import UserError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(UserError, match=rf"^--address: cannot reach the Ray cluster at {address} \(Connection "
                                            r"refused\); start it .*drop --address"):
            pipeline.init_ray(address)
    with socket.socket() as server:  # a listening port passes on to ray.init
        server.bind(("127.0.0.1", 0))
        server.listen()
        pipeline.check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    pipeline.check_reachable("auto")  # Ray's own forms are left to Ray


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "HTTPS://head:8265"])
def test_the_dashboards_http_address_is_one_line_before_ray_init(monkeypatch, address):
    """`ray job submit --address http://…:8265` is the README's own command; as --address or RAY_ADDRESS, ray.init
    refused it in a traceback."""
    import ray

    from orchestrator.errors import UserError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    with pytest.raises(UserError, match=rf"^--address: '{address}' \(or RAY_ADDRESS\) is the Ray dashboard's HTTP "
                                        r"address; give the cluster's host:6379"):
        pipeline.init_ray(address)


HEALTH_CHECK = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def test_runtime_env_keeps_a_value_the_user_set(monkeypatch):
    monkeypatch.delenv(HEALTH_CHECK, raising=False)
    assert pipeline.runtime_env_vars()[HEALTH_CHECK] == pipeline.RUNTIME_ENV[HEALTH_CHECK] == "0.5"
    monkeypatch.setenv(HEALTH_CHECK, "3")
    assert pipeline.runtime_env_vars()[HEALTH_CHECK] == "3"


def test_kernel_pins_set_in_the_driver_go_to_the_workers_and_only_then(monkeypatch):
    """README "Reproducibility": MKL_CBWR / ATEN_CPU_CAPABILITY pin the CPU kernels; a cluster's workers need them too."""
    for key in pipeline.KERNEL_PINS:
        monkeypatch.delenv(key, raising=False)
    assert not set(pipeline.KERNEL_PINS) & set(pipeline.runtime_env_vars())  # unpinned: each machine picks its own
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert {k: pipeline.runtime_env_vars()[k] for k in pipeline.KERNEL_PINS} == {"MKL_CBWR": "AVX2",
                                                                                 "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.slow
def test_ray_processes_of_the_embedded_cluster_get_the_runtime_env(embedded_ray):
    """Ray Train's controller reads the poll interval from its own process's environment: a Ray task must see it
    (the product's 0.5 s, not Ray's 2 s default; a value the user set takes the same path, see the test above)."""
    remote = embedded_ray.remote(lambda: {k: os.environ.get(k) for k in (HEALTH_CHECK, "RAY_TRAIN_V2_ENABLED")})
    assert embedded_ray.get(remote.remote()) == {HEALTH_CHECK: pipeline.runtime_env_vars()[HEALTH_CHECK],
                                                 "RAY_TRAIN_V2_ENABLED": "1"}
