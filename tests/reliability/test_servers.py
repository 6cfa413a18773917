"""Every server the project starts listens on 127.0.0.1 unless a flag says otherwise.

- `lora-search dashboard`: tests/test_dashboard.py (the CLI's listening sockets, and the warning for --host).
- The cluster YAMLs' `ray start --dashboard-host`: tests/test_cluster_yaml.py.
- The embedded Ray cluster `lora-search run` starts (pipeline.init_ray): here, on the shared hostile run.
  Ray's own gRPC ports (GCS, raylet, object manager, workers) listen on every interface in Ray 2.60 and
  cannot be moved; they are not HTTP and are documented in the README. The HTTP dashboard, whose job API
  runs arbitrary code, is the one that must stay on loopback.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_embedded_ray_dashboard_listens_on_loopback_only(hostile_run):
    exposure = hostile_run.ray_dashboard
    assert exposure["listening"] == {"127.0.0.1"}, exposure
    assert exposure["url"] == exposure["state_api"].removeprefix("http://"), exposure  # the state API is that dashboard
    assert exposure["from_loopback"], exposure
    if exposure["node_ip"] != "127.0.0.1":
        assert not exposure["from_node_ip"], exposure  # refused on the machine's network address
