"""The local test host's box: the seed's service shape, on the CPU with SmolLM2 drafting for itself.

`scripts/demo` and the e2e tests boot a systemd-nspawn host (tests.testbed) and write its
connection, the llama.cpp repo and commit, the model, and the knobs the tests turn (drafter
settings, thresholds, checksums) to the JSON file named by GPUBOX_TESTBED_CONFIG.
"""

import json
import os

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, SmokeThresholds

with open(os.environ.get("GPUBOX_TESTBED_CONFIG", ".cache/testbed.json")) as config_file:
    config = json.load(config_file)

# The target: SmolLM2 by default; the tests switch to a tiny random Gemma 4 pair (model_* keys).
target = ModelFile(
    path=config.get("model_path", "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    sha256=config["model_sha256"],
    source=config["model_source"],
    architecture=config.get("model_architecture", "llama"),
)
# SmolLM2 drafting for itself: the seed's drafter shape (a separate GGUF, its own path).
drafter = ModelFile(
    path=config.get("drafter_path", "/srv/models/drafter/SmolLM2-135M-Instruct.Q4_1.gguf"),
    sha256=config.get("drafter_sha256", config["model_sha256"]),
    source=config.get("drafter_source", config["model_source"]),
    architecture=config.get("drafter_architecture", "llama"),
)

gemma4 = LlamaServer(
    name="gemma4",
    gpus=(),
    model=target,
    model_draft=drafter,
    spec_type=config.get("spec_type", "draft-simple"),
    spec_draft_n_max=config.get("spec_draft_n_max", 3),
    ctx_size=4096,
    n_gpu_layers=99,
    cache_type_k="q8_0",
    cache_type_v="q8_0",
    parallel=1,
    flash_attn="on",
    cont_batching=True,
    jinja=True,
    port=config["port"],
    api_key_file=config.get("api_key_file"),
    fit="off",
    smoke=SmokeThresholds(
        # Honest for a shared 2-core CPU: SmolLM2 drafting for itself decoded at 47-58 tok/s alone
        # (101-121 without the drafter) and at 2-6 tok/s beside a parallel build. The smoke asserts it
        # serves and drafts; speed is the bench's to measure.
        min_tokens_per_second=config.get("min_tokens_per_second", 1.0),
        # None for the random-weight Gemma 4 pair: it drafts, but nothing is accepted.
        min_acceptance=config.get("min_acceptance", 0.5),
        n_predict=64,
        runs=2,
        timeout_s=120,
    ),
)

box = Box(
    llama_cpp=LlamaCppBuild(
        repo=config["repo"],
        commit=config["commit"],
        prefix=config.get("prefix", "/opt/llama.cpp"),
        cuda="auto",
        targets=("llama-server",),
        ccache_dir=config.get("ccache_dir"),
        jobs=config.get("jobs"),
    ),
    services=(gemma4,),
)

testbed = [(config["host_name"], {**config["host_data"], "box": box})]
