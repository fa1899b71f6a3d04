"""The RPC server type and a llama-server's references to it: refusals by field, the build, the units, the plan.

Each bad input of issue 24 is refused by field before any host is touched (``gpubox check`` reads the
inventory only); the end-to-end deploy on two test hosts is tests/e2e/test_rpc.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, RpcRef, RpcServer
from gpubox.binaries import parse_usage_options, unsupported_flags
from gpubox.build import build_name, build_script, cmake_configure_args, stamp_text
from gpubox.inventory import HostBox, with_peers
from gpubox.peers import resolve_peers
from gpubox.spec import problems_from
from gpubox.unit import render_unit
from gpubox.vram import layer_devices, parse_memory_breakdown

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
OTHER_COMMIT = "1" * 40
MODEL = ModelFile(path="/srv/models/m.gguf", sha256="a" * 64, architecture="llama")


def client(**changes: Any) -> LlamaServer:
    fields: dict[str, Any] = {
        "name": "big",
        "model": MODEL,
        "rpc": (RpcRef(host="helper", service="rpc0"),),
        "tensor_split": (1.0,),
        "fit": "off",
        "n_gpu_layers": "all",
    }
    return LlamaServer(**{**fields, **changes})


def boxes(*, client_server: LlamaServer | None = None, helper_services: tuple[Any, ...] | None = None,
          helper_commit: str = COMMIT, client_address: str = "10.0.0.1") -> dict[str, Box]:  # fmt: skip
    helper = helper_services or (RpcServer(name="rpc0", host="10.0.0.2", allow_from=("10.0.0.1/32",)),)
    return {
        "bigbox": Box(llama_cpp=LlamaCppBuild(commit=COMMIT), address=client_address,
                      services=(client_server or client(),)),
        "helper": Box(llama_cpp=LlamaCppBuild(commit=helper_commit), address="10.0.0.2", services=helper),
    }  # fmt: skip


def refused_fields(fleet: dict[str, Box]) -> dict[str, list[str]]:
    _, problems = resolve_peers(fleet)
    return {host: [problem.field for problem in found] for host, found in problems.items() if found}


def spec_refusal(build: Any) -> list[str]:
    with pytest.raises(ValidationError) as refused:
        build()
    return [problem.field for problem in problems_from(refused.value)]


# --- refused by field --------------------------------------------------------------------------------


def test_a_good_pair_resolves_the_endpoint_and_renders_it() -> None:
    resolved, problems = resolve_peers(boxes())
    assert not any(problems.values())
    server = resolved["bigbox"].services[0]
    assert server.rpc[0].endpoint == "10.0.0.2:50052"  # type: ignore[attr-defined]
    argv = server.argv("/opt/llama.cpp/current/llama-server")
    assert argv[argv.index("--rpc") + 1] == "10.0.0.2:50052"
    assert argv[argv.index("--tensor-split") + 1] == "1"
    assert argv[argv.index("--fit") + 1] == "off"


def test_an_unresolved_reference_does_not_render() -> None:
    with pytest.raises(ValueError, match="filled in from the whole inventory"):
        client().argv("llama-server")


def test_an_endpoint_written_by_hand_is_refused() -> None:
    assert spec_refusal(lambda: RpcRef(host="helper", service="rpc0", endpoint="10.0.0.9:1")) == ["endpoint"]


def test_a_missing_host_or_service_is_refused_at_the_reference() -> None:
    missing_host = client(rpc=(RpcRef(host="nosuch", service="rpc0"),))
    assert refused_fields(boxes(client_server=missing_host)) == {"bigbox": ["services.0.rpc.0.host"]}
    missing_service = client(rpc=(RpcRef(host="helper", service="nosuch"),))
    assert refused_fields(boxes(client_server=missing_service)) == {"bigbox": ["services.0.rpc.0.service"]}


def test_a_reference_to_another_type_is_refused() -> None:
    other = LlamaServer(name="rpc0", model=MODEL, port=50052)
    _, problems = resolve_peers(boxes(helper_services=(other,)))
    assert [p.field for p in problems["bigbox"]] == ["services.0.rpc.0.service"]
    assert "a llama-server" in problems["bigbox"][0].message


def test_an_rpc_server_that_does_not_admit_the_client_is_refused() -> None:
    _, problems = resolve_peers(boxes(client_address="10.0.0.7"))
    assert [p.field for p in problems["bigbox"]] == ["services.0.rpc.0"]
    assert "add 10.0.0.7/32 to rpc0's allow_from on helper" in problems["bigbox"][0].message
    loopback = (RpcServer(name="rpc0"),)  # 127.0.0.1 on helper: only helper itself reaches it
    _, problems = resolve_peers(boxes(helper_services=loopback))
    assert "only its own machine reaches" in problems["bigbox"][0].message


def test_client_and_server_on_different_commits_are_refused() -> None:
    _, problems = resolve_peers(boxes(helper_commit=OTHER_COMMIT))
    assert [p.field for p in problems["bigbox"]] == ["services.0.rpc.0"]
    assert "must be one commit" in problems["bigbox"][0].message


def test_one_rpc_server_used_by_two_llama_servers_is_refused() -> None:
    second = Box(
        llama_cpp=LlamaCppBuild(commit=COMMIT), address="10.0.0.3", services=(client(name="other"),)
    )
    helper = RpcServer(name="rpc0", host="10.0.0.2", allow_from=("10.0.0.0/24",))
    fleet = {**boxes(helper_services=(helper,)), "third": second}
    _, problems = resolve_peers(fleet)
    assert [p.field for p in problems["third"]] == ["services.0"]
    message = problems["third"][0].message
    assert "serves 1 client(s) at a time" in message and "big@bigbox" in message
    assert not problems["bigbox"]


def test_the_same_endpoint_twice_is_refused() -> None:
    twice = (RpcRef(host="helper", service="rpc0"), RpcRef(host="helper", service="rpc0"))
    assert spec_refusal(lambda: client(rpc=twice, tensor_split=(1.0, 1.0))) == ["rpc.1"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tensor_split": None}, "tensor_split"),
        ({"tensor_split": (1.0, 1.0)}, "tensor_split"),
        ({"tensor_split": (0.0,)}, "tensor_split"),
        ({"fit": None}, "fit"),
        ({"n_gpu_layers": 0}, "n_gpu_layers"),
        ({"extra_args": ("--rpc", "10.0.0.2:50052")}, "extra_args.0"),
        ({"extra_args": ("-ts", "1")}, "extra_args.0"),
        (
            {"model_draft": ModelFile(path="/srv/models/d.gguf", sha256="b" * 64, architecture="llama"),
             "spec_type": "draft-simple"},
            "model_draft",
        ),
    ],
)
def test_a_client_without_an_explicit_split_is_refused(changes: dict[str, Any], field: str) -> None:
    assert field in spec_refusal(lambda: client(**changes))


def test_an_rpc_server_open_to_any_is_refused() -> None:
    assert spec_refusal(lambda: RpcServer(name="rpc0", host="0.0.0.0", allow_from=("any",))) == ["allow_from"]
    assert spec_refusal(lambda: RpcServer(name="rpc0", host="0.0.0.0")) == ["allow_from"]
    assert spec_refusal(lambda: RpcServer(name="rpc0", gpus=(0, 1))) == ["gpus"]


def test_two_rpc_servers_on_one_port_are_refused() -> None:
    def two() -> Box:
        return Box(llama_cpp=LlamaCppBuild(commit=COMMIT), services=(RpcServer(name="a"), RpcServer(name="b")))

    assert spec_refusal(two) == ["services.1.port"]


def test_gpubox_check_refuses_a_bad_reference_by_field(tmp_path: Path) -> None:
    inventory = tmp_path / "pair.py"
    inventory.write_text(textwrap.dedent(f"""
        from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, RpcRef, RpcServer
        model = ModelFile(path="/srv/m.gguf", sha256="a" * 64, architecture="llama")
        big = LlamaServer(name="big", model=model, rpc=(RpcRef(host="helper", service="rpc9"),),
                          tensor_split=(1.0,), fit="off")
        hosts = [
            ("bigbox", {{"box": Box(llama_cpp=LlamaCppBuild(commit="{COMMIT}"), address="10.0.0.1", services=(big,))}}),
            ("helper", {{"box": Box(llama_cpp=LlamaCppBuild(commit="{COMMIT}"), address="10.0.0.2",
                                   services=(RpcServer(name="rpc0"),))}}),
        ]
    """))
    result = subprocess.run(
        [sys.executable, "-c", "from gpubox.cli import main; raise SystemExit(main())", "check", str(inventory)],
        capture_output=True, text=True, cwd=ROOT, env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"}, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "services.0.rpc.0.service" in result.stdout and "rpc9" in result.stdout


def test_with_peers_keeps_other_problems_and_resolves_the_rest() -> None:
    fleet = boxes()
    host_boxes = [HostBox(host=name, box=box, problems=[]) for name, box in fleet.items()]
    resolved = with_peers(host_boxes)
    assert all(not host_box.problems for host_box in resolved)
    assert resolved[0].box is not None and resolved[0].box.services[0].rpc[0].endpoint == "10.0.0.2:50052"  # type: ignore[attr-defined]


# --- the build -----------------------------------------------------------------------------------------


def test_the_box_turns_rpc_on_for_both_ends_and_names_the_build() -> None:
    fleet = boxes()
    for name in ("bigbox", "helper"):
        (build,) = fleet[name].builds()
        assert isinstance(build, LlamaCppBuild) and build.rpc and "ggml-rpc-server" in build.targets
        assert build_name(build, "cpu") == f"{COMMIT}-cpu-rpc"
        assert json.loads(stamp_text(build, "cpu"))["options"] == ["rpc"]
        configure = cmake_configure_args(build, "cpu")
        assert "-DGGML_RPC=ON" in configure and "-DGGML_RPC_RDMA=OFF" in configure
        script = build_script(build, "cpu")
        assert "ggml-rpc-server.help" in script and "llama-server.help" in script
    plain = Box(llama_cpp=LlamaCppBuild(commit=COMMIT), services=(LlamaServer(name="m", model=MODEL),))
    (build,) = plain.builds()
    assert not build.rpc and build_name(build, "cpu") == f"{COMMIT}-cpu"  # unchanged for every existing box
    assert "options" not in json.loads(stamp_text(build, "cpu"))
    assert "-DGGML_RPC=ON" not in cmake_configure_args(build, "cpu")


def test_a_changed_cmake_option_is_another_build() -> None:
    base = LlamaCppBuild(commit=COMMIT)
    names = {
        build_name(base, "cpu"),
        build_name(base.model_copy(update={"extra_cmake_args": ("-DLLAMA_OPENSSL=OFF",)}), "cpu"),
        build_name(base.model_copy(update={"extra_cmake_args": ("-DLLAMA_OPENSSL=ON",)}), "cpu"),
        build_name(base.model_copy(update={"native": True}), "cpu"),
        build_name(base.model_copy(update={"cpu_features": ("AVX2",)}), "cpu"),
    }
    assert len(names) == 5
    changed = base.model_copy(update={"extra_cmake_args": ("-DLLAMA_OPENSSL=OFF",)})
    assert json.loads(stamp_text(changed, "cpu"))["extra_cmake_args"] == ["-DLLAMA_OPENSSL=OFF"]


# --- the units -----------------------------------------------------------------------------------------


def test_the_rpc_servers_unit_caches_in_its_own_directory_and_admits_its_client() -> None:
    server = RpcServer(name="rpc0", host="10.0.0.2", allow_from=("10.0.0.1/32",), threads=4)
    unit = render_unit(server, server.binary("/opt/llama.cpp"))
    assert "ExecStart=/opt/llama.cpp/current/ggml-rpc-server \\\n    --host 10.0.0.2 \\\n    --port 50052" in unit
    assert "--threads 4" in unit and "--cache" in unit
    assert "CacheDirectory=gpubox-rpc/rpc0" in unit
    assert "Environment=LLAMA_CACHE=/var/cache/gpubox-rpc/rpc0" in unit
    assert "IPAddressAllow=localhost 10.0.0.1/32" in unit and "IPAddressDeny=any" in unit


def test_the_clients_unit_may_reach_its_rpc_servers() -> None:
    resolved, _ = resolve_peers(boxes())
    server = resolved["bigbox"].services[0]
    unit = render_unit(server, server.binary("/opt/llama.cpp"))
    assert "IPAddressAllow=localhost 10.0.0.2" in unit


# --- the plan ------------------------------------------------------------------------------------------


def test_layers_go_to_devices_as_llama_cpp_assigns_them() -> None:
    # llama_model::load_tensors: layer il (the head is il = n_layer) goes to the first device whose
    # cumulative share exceeds (il - i_gpu_start) / act_gpu_layers
    assert layer_devices(4, "all", (1.0, 1.0)) == [0, 0, 0, 1, 1]
    assert layer_devices(4, "all", (3.0, 1.0)) == [0, 0, 0, 0, 1]
    assert layer_devices(4, 2, (1.0, 1.0)) == [None, None, None, 0, 1]
    assert layer_devices(4, "all", (1.0,)) == [0, 0, 0, 0, 0]


def test_the_log_parser_reads_the_real_rpc_buffer_lines() -> None:
    """llama-server's lines with every layer on a ggml-rpc-server holding an H100 (docs/gpu-validation.md)."""
    log = (ROOT / "tests" / "fixtures" / "llamacpp" / "rpc-client-buffers-h100-ctx65536.log").read_text()
    breakdown = parse_memory_breakdown(log)
    assert breakdown.total("model", "RPC0") == pytest.approx(92.17)
    assert breakdown.total("KV", "RPC0") == pytest.approx(1440.0)
    assert breakdown.total("compute", "RPC0") == pytest.approx(76.38)
    assert breakdown.total("model", "CPU") == pytest.approx(28.69)


def test_the_log_parser_reads_rpc_buffers() -> None:
    log = (
        "load_tensors:   RPC0[127.0.0.1:50052] model buffer size =    88.73 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =    27.00 MiB\n"
        "llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =    45.00 MiB\n"
    )
    breakdown = parse_memory_breakdown(log)
    assert breakdown.total("model", "RPC0") == pytest.approx(88.73)
    assert breakdown.total("KV", "RPC0") == pytest.approx(45.0)
    assert breakdown.total("model", "CPU") == pytest.approx(27.0)


RPC_HELP = (ROOT / "tests" / "fixtures" / "llamacpp" / "rpc-server-help-0c1e57098.txt").read_text().splitlines()
"""``ggml-rpc-server --help`` of the pinned tree (0c1e57098, GGML_RPC=ON, CPU build on a 2-core machine: the
threads default is half the cores); the usage text does not depend on the backend."""


def test_the_real_rpc_server_help_lists_every_flag_the_unit_uses() -> None:
    flags = parse_usage_options(RPC_HELP)
    assert set(flags.flags) == {"-h", "--help", "-t", "--threads", "-d", "--device", "-H", "--host", "-p", "--port",
                                "-c", "--cache"}
    lender = RpcServer(name="rpc0", gpus=(0,), threads=4, host="10.0.0.2", allow_from=("10.0.0.1/32",))
    assert unsupported_flags(lender.command_flags(), flags) == []
    assert unsupported_flags(["--version"], flags) == ["--version"]  # it has none: the build saves --help only


def plan_json(inventory: Path) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", "from gpubox.cli import main; raise SystemExit(main())", "plan", "--json",
         str(inventory)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    return result.returncode, json.loads(result.stdout)


def test_plan_prices_the_lent_gpu_on_the_lending_host() -> None:
    code, plan = plan_json(ROOT / "inventory" / "rpc_pair.py")
    assert code == 0, plan
    hosts = {host["host"]: host for host in plan["hosts"]}
    (remote,) = hosts["bigbox"]["remote_devices"]
    assert remote["rpc"] == "rpc-gpu0@helper" and remote["device"] == "GPU 0"
    (helper_gpu,) = hosts["helper"]["gpus"]
    (lent,) = helper_gpu["services"]
    assert lent["service"] == "gemma4@bigbox via rpc-gpu0"
    # the helper holds the client's share plus its own process's CUDA context
    assert lent["total_bytes"] == remote["total_bytes"] + lent["terms_bytes"]["headroom"]
    (local,) = hosts["bigbox"]["gpus"][0]["services"]
    # an even split of the layers: each device about half the weights (the head on the local GPU)
    assert 0.7 < remote["terms_bytes"]["weights"] / local["terms_bytes"]["weights"] < 1.3


def test_plan_refuses_a_lent_gpu_over_budget_naming_the_client(tmp_path: Path) -> None:
    source = (ROOT / "inventory" / "rpc_pair.py").read_text()
    small = source.replace("memory_total_mib=24576", "memory_total_mib=2048").replace(
        '"""Two hosts', '"""(a 2 GiB helper) Two hosts'
    )
    inventory = tmp_path / "rpc_pair.py"
    inventory.write_text(small)
    (tmp_path / "gguf-headers").symlink_to(ROOT / "inventory" / "gguf-headers")
    code, plan = plan_json(inventory)
    assert code == 2
    helper = next(host for host in plan["hosts"] if host["host"] == "helper")
    assert not helper["fits"] and not helper["gpus"][0]["fits"]
