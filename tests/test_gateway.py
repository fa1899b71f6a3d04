"""The gateway: its spec's refusals, its backends checked across the inventory, its keys, and its HAProxy config
run by Debian's real HAProxy 2.6 in front of two stub backends (routing, errors, keys, admin paths)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import ValidationError

from gpubox import BackendRef, Box, Gateway, LlamaCppBuild, LlamaServer, ModelFile, ModelGroup, RpcServer
from gpubox.bench import free_port
from gpubox.gateway import Backend, resolve_backends
from gpubox.gateway_keys import environment_text, group_key
from gpubox.haproxy import haproxy_config
from gpubox.spec import problems_from
from operations.gateway import drop_in_text

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
MODEL = ModelFile(path="/srv/models/m.gguf", sha256="a" * 64, architecture="llama")
OTHER_MODEL = ModelFile(path="/srv/models/m.gguf", sha256="b" * 64, architecture="llama")


def group(*hosts: str, min_healthy: int = 1, name: str = "smol") -> ModelGroup:
    return ModelGroup(name=name, backends=tuple(BackendRef(host=h, service="llama") for h in hosts),
                      min_healthy=min_healthy)  # fmt: skip


def node(address: str, model: ModelFile = MODEL, **changes: Any) -> Box:
    server = {"name": "llama", "model": model, "host": "0.0.0.0", "api_key_file": "generate",
              "allow_from": ("10.0.0.1/32",), **changes}  # fmt: skip
    return Box(llama_cpp=LlamaCppBuild(commit=COMMIT), address=address, services=(LlamaServer(**server),))


def fleet(**changes: Box) -> dict[str, Box]:
    return {"n1": node("10.0.0.2"), "n2": node("10.0.0.3"), **changes}


def refused(build: Any) -> list[str]:
    with pytest.raises(ValidationError) as error:
        build()
    return [problem.field for problem in problems_from(error.value)]


# --- the spec --------------------------------------------------------------------------------------


def test_min_healthy_above_the_group_is_refused() -> None:
    assert refused(lambda: group("n1", "n2", min_healthy=3)) == ["min_healthy"]


def test_a_backend_listed_twice_is_refused() -> None:
    assert refused(lambda: group("n1", "n1")) == ["backends.1"]


def test_two_groups_with_one_name_are_refused() -> None:
    assert refused(lambda: Gateway(groups=(group("n1"), group("n2")))) == ["groups.1.name"]


def test_a_gateway_beyond_loopback_needs_keys_and_allow_from() -> None:
    assert refused(lambda: Gateway(groups=(group("n1"),), host="0.0.0.0")) == ["api_key_file", "allow_from"]
    open_one = Gateway(groups=(group("n1"),), host="0.0.0.0", api_key_file="generate", allow_from=("any",))
    assert open_one.api_key_file == "/etc/gpubox/gateway/client.key" and open_one.generate_api_key
    assert [field for field, _ in open_one.warnings()] == ["tls_cert"]  # keys in the clear: check warns


def test_a_group_name_must_be_a_model_name_and_a_path_prefix() -> None:
    assert refused(lambda: group("n1", name="Big Model")) == ["name"]


# --- across the inventory ------------------------------------------------------------------------


def problems_of(gateway: Gateway, boxes: dict[str, Box], host: str = "gw") -> list[str]:
    _, problems = resolve_backends(host, gateway, boxes)
    return [problem.field for problem in problems]


GATEWAY = Gateway(address="10.0.0.1", groups=(group("n1", "n2"),))


def test_good_backends_resolve_with_their_address_slots_and_key() -> None:
    backends, problems = resolve_backends("gw", GATEWAY, fleet())
    assert not problems
    first = backends["smol"][0]
    assert (first.address, first.port, first.parallel) == ("10.0.0.2", 8080, 1)
    assert first.key_file == "/etc/gpubox/keys/llama.key" and first.server_name == "n1:llama"


def test_a_missing_backend_is_refused_by_field() -> None:
    missing_host = Gateway(address="10.0.0.1", groups=(group("n9"),))
    assert problems_of(missing_host, fleet()) == ["gateway.groups.0.backends.0.host"]
    missing = ModelGroup(name="g", backends=(BackendRef(host="n1", service="x"),))
    missing_service = Gateway(address="10.0.0.1", groups=(missing,))
    assert problems_of(missing_service, fleet()) == ["gateway.groups.0.backends.0.service"]


def test_a_group_mixing_models_is_refused() -> None:
    assert problems_of(GATEWAY, fleet(n2=node("10.0.0.3", OTHER_MODEL))) == ["gateway.groups.0.backends"]


def test_a_backend_the_gateway_cannot_reach_is_refused() -> None:
    loopback = Box(llama_cpp=LlamaCppBuild(commit=COMMIT), address="10.0.0.2",
                   services=(LlamaServer(name="llama", model=MODEL),))  # fmt: skip
    assert problems_of(GATEWAY, fleet(n1=loopback)) == ["gateway.groups.0.backends.0"]
    closed = node("10.0.0.3", allow_from=("10.9.0.0/16",))
    assert problems_of(GATEWAY, fleet(n2=closed)) == ["gateway.groups.0.backends.1"]


def test_a_backend_of_another_type_is_refused() -> None:
    rpc = Box(llama_cpp=LlamaCppBuild(commit=COMMIT), address="10.0.0.2", services=(RpcServer(name="llama"),))
    assert problems_of(GATEWAY, fleet(n1=rpc)) == ["gateway.groups.0.backends.0.service"]


def test_a_gateway_port_taken_on_its_own_host_is_refused() -> None:
    local = Box(llama_cpp=LlamaCppBuild(commit=COMMIT), address="10.0.0.1",
                services=(LlamaServer(name="llama", model=MODEL, port=8000),))  # fmt: skip
    gateway = Gateway(address="10.0.0.1", groups=(group("gw"),))
    assert problems_of(gateway, {"gw": local}) == ["gateway.port"]


# --- keys ----------------------------------------------------------------------------------------


def test_a_group_key_is_made_once_in_a_store_only_its_user_reads(tmp_path: Path) -> None:
    key = group_key("gw", "smol", tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert group_key("gw", "smol", tmp_path) == key and group_key("gw", "other", tmp_path) != key
    path = tmp_path / "gw" / "smol.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert environment_text([key]) == f"GPUBOX_GROUP_KEY_0={key}\n"


def test_the_config_holds_no_key() -> None:
    backends, _ = resolve_backends("gw", GATEWAY, fleet())
    config = haproxy_config(GATEWAY, backends, keyed_groups={"smol"})
    assert 'http-request set-header Authorization "Bearer ${GPUBOX_GROUP_KEY_0}"' in config
    assert "maxconn 1" in config and "balance leastconn" in config and "retry-on conn-failure" in config
    assert "server n1:llama 10.0.0.2:8080 check" in config


# --- the drop-in ---------------------------------------------------------------------------------


DEBIAN_UNIT = Path("/lib/systemd/system/haproxy.service")


def test_the_drop_in_brings_the_distros_unit_to_the_exposure_bar(tmp_path: Path) -> None:
    assert DEBIAN_UNIT.is_file(), "Debian's haproxy package is missing: scripts/setup installs it"
    unit = DEBIAN_UNIT.read_text()
    drop_in = drop_in_text().split("[Service]\n", 1)[1]
    combined = tmp_path / "haproxy.service"
    combined.write_text(unit.replace("[Service]\n", "[Service]\n" + drop_in, 1))
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(combined)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    bare = tmp_path / "bare" / "haproxy.service"
    bare.parent.mkdir()
    bare.write_text(unit)
    before = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(bare)],
                            capture_output=True, text=True, check=False).stdout  # fmt: skip
    distro = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", before)
    print(f"haproxy.service exposure: {distro.group(1) if distro else '?'} -> {match.group(1)}")
    assert float(match.group(1)) <= 2.0


# --- the config, run by HAProxy ------------------------------------------------------------------


class Echo(BaseHTTPRequestHandler):
    """A stub backend: answers what it got (path, key, body length) and which backend it is."""

    def _answer(self, body: bytes = b"") -> None:
        answer = json.dumps({"path": self.path, "auth": self.headers.get("Authorization"), "length": len(body),
                             "backend": self.server.server_port}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Running:
    url: str
    stats: str
    backends: dict[str, int]


@pytest.fixture(scope="module")
def gateway_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    assert shutil.which("haproxy"), "HAProxy is missing: scripts/setup installs Debian's haproxy"
    work = tmp_path_factory.mktemp("haproxy")
    servers = [ThreadingHTTPServer(("127.0.0.1", free_port()), Echo) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    spec = Gateway(
        groups=(ModelGroup(name="smol", backends=(BackendRef(host="a", service="l"),)),
                ModelGroup(name="big", backends=(BackendRef(host="b", service="l"),))),
        port=free_port(), stats_port=free_port(), api_key_file="/etc/gpubox/gateway/client.key", buffer_bytes=16384,
    )  # fmt: skip
    backends = {
        name: (Backend(ref=BackendRef(host=h, service="l"), address="127.0.0.1", port=server.server_port,
                       parallel=1, model_sha256=name, key_file=key),)
        for name, h, server, key in (("smol", "a", servers[0], None), ("big", "b", servers[1], "/k"))
    }  # fmt: skip
    config = haproxy_config(spec, backends, keyed_groups={"big"})
    for real in ("/run/haproxy/", "/var/lib/haproxy/", "/etc/gpubox/gateway/"):
        config = config.replace(real, f"{work}/")
    config = config.replace("    log /dev/log local0\n", "")
    (work / "haproxy.cfg").write_text(config)
    (work / "client-keys.acl").write_text("Bearer client-key\n")
    environment = {**os.environ, "GPUBOX_GROUP_KEY_1": "backend-key"}
    check = subprocess.run(["haproxy", "-c", "-f", str(work / "haproxy.cfg")], capture_output=True, text=True,
                           env=environment, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    process = subprocess.Popen(["haproxy", "-db", "-f", str(work / "haproxy.cfg")], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{spec.port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            requests.get(f"{url}/v1/models", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    try:
        yield Running(url=url, stats=f"http://127.0.0.1:{spec.stats_port}/metrics",
                      backends={"smol": servers[0].server_port, "big": servers[1].server_port})  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=10)
        for server in servers:
            server.shutdown()


KEY = {"Authorization": "Bearer client-key"}


def test_a_request_without_the_gateways_key_is_refused(gateway_running: Running) -> None:
    answer = requests.post(f"{gateway_running.url}/v1/chat/completions", json={"model": "smol"}, timeout=5)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == 401
    wrong = requests.post(f"{gateway_running.url}/v1/chat/completions", json={"model": "smol"}, timeout=5,
                          headers={"Authorization": "Bearer nope"})  # fmt: skip
    assert wrong.status_code == 401


def test_the_body_model_routes_and_the_clients_key_stays_at_the_gateway(gateway_running: Running) -> None:
    smol = requests.post(f"{gateway_running.url}/v1/chat/completions", json={"model": "smol"}, headers=KEY, timeout=5)
    assert smol.status_code == 200
    assert smol.json() | {"length": 0} == {"path": "/v1/chat/completions", "auth": None, "length": 0,
                                           "backend": gateway_running.backends["smol"]}  # fmt: skip
    big = requests.post(f"{gateway_running.url}/v1/completions", json={"model": "big"}, headers=KEY, timeout=5)
    assert big.json()["backend"] == gateway_running.backends["big"]
    assert big.json()["auth"] == "Bearer backend-key"  # the group's key, from the environment


def test_the_prefix_routes_any_body_size_and_is_stripped(gateway_running: Running) -> None:
    body = json.dumps({"model": "whatever", "prompt": "x" * 200_000})
    answer = requests.post(f"{gateway_running.url}/big/v1/completions", data=body, headers=KEY, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["path"] == "/v1/completions" and answer.json()["length"] == len(body)


def test_a_body_too_large_to_route_gets_a_413_naming_the_prefix_route(gateway_running: Running) -> None:
    body = {"model": "smol", "prompt": "x" * 50_000}
    answer = requests.post(f"{gateway_running.url}/v1/completions", json=body, headers=KEY, timeout=10)
    assert answer.status_code == 413
    assert "/smol/v1/..." in answer.json()["error"]["message"]


def test_an_unknown_model_gets_a_404_listing_the_groups(gateway_running: Running) -> None:
    answer = requests.post(f"{gateway_running.url}/v1/chat/completions", json={"model": "nosuch"}, headers=KEY,
                           timeout=5)  # fmt: skip
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == "unknown model nosuch: the models are smol, big"


def test_models_lists_the_groups(gateway_running: Running) -> None:
    answer = requests.get(f"{gateway_running.url}/v1/models", headers=KEY, timeout=5)
    assert [model["id"] for model in answer.json()["data"]] == ["smol", "big"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/smol/metrics"), ("GET", "/big/slots"), ("POST", "/smol/props"),
                                              ("GET", "/metrics"), ("POST", "/smol/slots/0?action=save")])  # fmt: skip
def test_admin_paths_do_not_pass(gateway_running: Running, method: str, path: str) -> None:
    answer = requests.request(method, f"{gateway_running.url}{path}", headers=KEY, json={}, timeout=5)
    assert answer.status_code == 403, (path, answer.status_code, answer.text)


def test_the_exporter_answers_on_loopback(gateway_running: Running) -> None:
    text = requests.get(gateway_running.stats, timeout=5).text
    assert 'haproxy_backend_active_servers{proxy="group_smol"}' in text
