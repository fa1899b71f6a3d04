"""The e2e test host's inventory: a Box that mirrors the seed's, on the CPU with SmolLM2.

The tests write the connection and the knobs they turn (drafter settings, thresholds, model
checksum) to the JSON file named by GPUBOX_E2E_CONFIG; see tests/e2e/test_deploy.py.
"""

import json
import os

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, SmokeThresholds

with open(os.environ["GPUBOX_E2E_CONFIG"]) as config_file:
    config = json.load(config_file)

smollm2 = ModelFile(
    path="/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256=config["model_sha256"],
    source=config["model_source"],
    architecture="llama",
)
# SmolLM2 drafting for itself: the seed's drafter shape (a separate GGUF, its own path).
drafter = ModelFile(
    path="/srv/models/drafter/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256=config.get("drafter_sha256", config["model_sha256"]),
    source=config.get("drafter_source", config["model_source"]),
    architecture="llama",
)

gemma4 = LlamaServer(
    name="gemma4",
    gpus=(),
    model=smollm2,
    model_draft=drafter,
    spec_type="draft-simple",
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
    fit="off",
    smoke=SmokeThresholds(
        # Honest for 2 CPU cores: drafting decoded at ~47 tok/s here (101 without a drafter).
        min_tokens_per_second=config.get("min_tokens_per_second", 5.0),
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
        cuda="auto",
        targets=("llama-server",),
        ccache_dir=config.get("ccache_dir"),
        jobs=config.get("jobs"),
    ),
    services=(gemma4,),
)

testbed = [(config["host_name"], {**config["host_data"], "box": box})]
