"""The seed's serving path for real, on a CPU: a tiny random Gemma 4 target + its MTP assistant.

`tests.testbed.tiny_gemma4` writes a `gemma4` target and a `gemma4-assistant` drafter GGUF with
random weights; the pinned llama.cpp's llama-server serves them with exactly the command line
gpubox renders for a draft-mtp service, and the answer's timings must show the drafter drafted.
Acceptance is meaningless with random weights and is only reported.

The binary is LLAMA_SERVER_BIN, or the CPU llama-server built here (`local_llama_server`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from gpubox.bench import local_server
from gpubox.gguf_header import read_gguf_header
from gpubox.servers.llama import LlamaServer
from gpubox.smoke import read_spec_counters, requests_transport
from gpubox.spec import ModelFile
from gpubox.unit import server_environment
from tests.testbed import free_port, local_llama_server, sha256_file
from tests.testbed.tiny_gemma4 import write_tiny_gemma4

pytestmark = pytest.mark.e2e

COMPLETION_TIMEOUT_S = 600  # ~50 tok/s on an idle 2-core CPU; under heavy contention it fell to ~1 tok/s


def llama_server_binary() -> Path:
    configured = os.environ.get("LLAMA_SERVER_BIN")
    return Path(configured) if configured else local_llama_server()


@dataclass
class Served:
    url: str
    argv: list[str]
    log: Path


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4"), seed=0)


def mtp_service(target: Path, assistant: Path, port: int) -> LlamaServer:
    return LlamaServer(
        name="tiny-gemma4-mtp",
        model=ModelFile(path=str(target), sha256=sha256_file(target), architecture="gemma4"),
        model_draft=ModelFile(path=str(assistant), sha256=sha256_file(assistant), architecture="gemma4-assistant"),
        spec_type="draft-mtp",
        spec_draft_n_max=3,
        parallel=1,
        flash_attn="on",
        cache_type_k="q8_0",
        cache_type_v="q8_0",
        port=port,
    )


@pytest.fixture(scope="module")
def served(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    binary = llama_server_binary()
    target, assistant = tiny_pair
    service = mtp_service(target, assistant, free_port())
    argv = service.argv(str(binary))
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    environment = {**os.environ, **server_environment(service)}
    with log_path.open("w+b") as log, local_server(argv, environment, service.port, log):
        yield Served(f"http://{service.host}:{service.port}", argv, log_path)


def test_the_pair_has_the_seed_architectures(tiny_pair: tuple[Path, Path]) -> None:
    target, assistant = (read_gguf_header(path) for path in tiny_pair)
    assert target.architecture == "gemma4"
    assert assistant.architecture == "gemma4-assistant"
    assert assistant.arch_get("embedding_length_out") == target.arch_get("embedding_length")
    assert assistant.arch_get("nextn_predict_layers") == assistant.block_count


def test_the_writer_is_deterministic(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    again = write_tiny_gemma4(tmp_path, seed=0)
    assert [sha256_file(path) for path in again] == [sha256_file(path) for path in tiny_pair]


def test_the_command_line_is_the_draft_mtp_service(served: Served, tiny_pair: tuple[Path, Path]) -> None:
    target, assistant = tiny_pair
    argv = served.argv
    assert argv[argv.index("--model") + 1] == str(target)
    assert argv[argv.index("--model-draft") + 1] == str(assistant)
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp"
    assert argv[argv.index("--spec-draft-n-max") + 1] == "3"
    assert "--metrics" in argv


def test_draft_mtp_drafts(served: Served) -> None:
    transport = requests_transport(served.url)
    before = read_spec_counters(transport)
    body: dict[str, Any] = {
        "prompt": "The tiny Gemma says hello to its assistant.",
        "n_predict": 32, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
    }  # fmt: skip
    started = time.monotonic()
    response = requests.post(f"{served.url}/completion", json=body, timeout=COMPLETION_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    timings = response.json()["timings"]
    print(
        f"\ntiny gemma4 draft-mtp: predicted_n={timings['predicted_n']} "
        f"tok/s={timings['predicted_per_second']:.2f} draft_n={timings.get('draft_n')} "
        f"draft_n_accepted={timings.get('draft_n_accepted')} wall={elapsed:.1f}s"
    )
    assert timings["predicted_n"] == 32
    assert timings.get("draft_n", 0) > 0, f"no drafting: {timings}"

    log = served.log.read_text(errors="replace")
    # the drafter is loaded as a separate model and attends over the target's KV cache
    assert "loading draft model" in log
    assert re.search(r"llama_kv_cache: layer +\d+: sharing with layer \d+", log), log

    after = read_spec_counters(transport)
    if after is not None:  # --metrics is on in the rendered service, so the counters must have moved
        drafted_before = before.draft_tokens if before is not None else 0.0
        accepted_before = before.accepted_tokens if before is not None else 0.0
        assert after.draft_tokens - drafted_before == timings["draft_n"]
        assert after.accepted_tokens - accepted_before == timings["draft_n_accepted"]
    else:
        pytest.fail("/metrics lacks the speculative-decoding counters although --metrics is rendered")
