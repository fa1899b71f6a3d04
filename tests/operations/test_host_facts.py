"""`operations.host_facts.prefetch`: a run's reads in one round trip, a merged fact's reads as one request.

The host answers the batch fact (`facts.batch.Facts`) with outputs the test writes, as a real host's
shell would print them, and fails any other fact: a read `prefetch` should have answered would go there.
"""

from __future__ import annotations

from typing import Any

from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.files import File
from pyinfra_testing.util import FakeState

from facts import batch
from facts.systemd import UnitStates
from gpubox.running import StaleProbe, UnitState
from operations.host_facts import prefetch, read

PROBE = StaleProbe("gemma4.service", "/etc/systemd/system/gemma4.service", ("/srv/m.gguf",), "/opt/l/current/s")
RECORDS = {
    "gemma4.service": ["MainPID=0", "Id=gemma4.service", "SubState=running", "UnitFileState=enabled"],
    "prometheus.service": ["MainPID=0", "Id=prometheus.service", "SubState=dead", "UnitFileState=enabled"],
}


class BatchHost:
    name = "box"
    data: dict[str, Any] = {}

    def __init__(self) -> None:
        self.requests: list[tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]] = []

    def get_fact(self, fact: type, **arguments: Any) -> Any:
        assert fact is batch.Facts, f"{fact.__name__} read outside the batch"
        requests = arguments["requests"]
        self.requests.append(requests)
        outputs = []
        for name, fact_arguments in requests:
            if name == "facts.systemd.UnitStates":
                units = dict(fact_arguments)["units"]
                lines = [line for unit in units for line in [*RECORDS[unit], ""]]
                outputs.append((lines, 0))
            else:
                outputs.append((["regular=/srv/m.gguf", "size=3"], 0))
        return outputs


def test_a_runs_unit_state_reads_are_one_request_and_each_read_gets_its_share() -> None:
    host = BatchHost()
    stale_read = (UnitStates, {"units": ("gemma4.service",), "probes": (PROBE,)})
    gemma_read = (UnitStates, {"units": ("gemma4.service",)})
    prometheus_read = (UnitStates, {"units": ("prometheus.service",)})
    with ctx_state.use(FakeState()), ctx_host.use(host):
        prefetch([stale_read, (File, {"path": "/srv/m.gguf"}), gemma_read, prometheus_read])
        (requests,) = host.requests
        assert [name for name, _ in requests] == ["files.File", "facts.systemd.UnitStates"]
        assert dict(requests[1][1]) == {"units": ("gemma4.service", "prometheus.service"), "probes": (PROBE,)}
        assert read(gemma_read) == {"gemma4.service": UnitState(active=True, enabled=True)}
        assert read(prometheus_read) == {"prometheus.service": UnitState(active=False, enabled=True)}
        assert read(stale_read) == {"gemma4.service": UnitState(active=True, enabled=True)}
        prefetch([gemma_read, prometheus_read])  # loaded already: no second round trip
    assert len(host.requests) == 1
