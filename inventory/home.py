"""danarch4090: the seed's home box, typed: the LLM on GPU 0, speech on GPU 1.

One RTX 4090 (GPU 0) serves Gemma 4 12B QAT with its MTP assistant drafter; GPU 1 runs
whisper-server (speech to text) and piper (text to speech), so gemma4 keeps the whole 4090: the
seed's reason for its 256k context beside ~2 GB of headroom. The seed does not name the second
card, its memory, the whisper model or the voice: the values below are placeholders to set (the
planner budgets GPU 1 against `expected_gpus`). The LLM recipe is the seed write-up's "working recipe",
with `--flash-attn on` (the seed's bare `--flash-attn` no longer parses) and `--parallel 1`
rendered explicitly (its default is 4 slots: the parallel trap).

Run: `gpubox check inventory/home.py`, `pyinfra inventory/home.py deploys/danarch4090.py`; watch it
with `pyinfra inventory/home.py deploys/observability.py` and `gpubox top inventory/home.py`.
"""

from gpubox import (
    Box,
    ExpectedGpu,
    HuggingFace,
    LlamaCppBuild,
    LlamaServer,
    ModelFile,
    Monitoring,
    PiperInstall,
    PiperServer,
    SmokeThresholds,
    SpeechSmoke,
    TranscriptionSmoke,
    WhisperCppBuild,
    WhisperServer,
)

# llama.cpp b11312 (2026-10-01): has the gemma4-assistant loader and `--spec-type draft-mtp`.
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

# whisper.cpp with whisper-server's /health and /inference (the commit the tests build: pywhispercpp 1.5.1's).
WHISPER_CPP_COMMIT = "f24588a272ae8e23280d9c220536437164e6ed28"

# The QAT GGUFs are a gated download from Google's Gemma 4 release on the Hugging Face hub (the seed
# placed them by hand): accept the licence on each model page, put a read token in a file only you can
# read (`chmod 600 ~/.config/gpubox/hf-token`) and the deploy downloads them on the box, resuming a cut
# download, the token only ever in a root-only header file for curl. The seed names the files, not the
# repos: the repo names below are the release's naming pattern, and the revisions and sha256s are
# placeholders that could not be looked up from where this file was written. Fill in the commit of each
# file (its page's history) and the `sha256sum` of the file: `gpubox check` flags both until you do, and
# a deploy refuses a file whose checksum differs (its message prints the checksum it found).
TARGET_REVISION = "0" * 40
DRAFTER_REVISION = "1" * 40
TARGET_SHA256 = "0" * 64
DRAFTER_SHA256 = "1" * 64
HUB = HuggingFace(token_file="~/.config/gpubox/hf-token")

gemma4 = LlamaServer(
    name="gemma4",
    gpus=(0,),
    user="llama",
    model=ModelFile(
        path="/home/dan/models/gemma-4-12b-it-qat-q4_0.gguf",
        sha256=TARGET_SHA256,
        source=f"hf://google/gemma-4-12b-it-qat-q4_0-gguf/gemma-4-12b-it-qat-q4_0.gguf@{TARGET_REVISION}",
        architecture="gemma4",
    ),
    model_draft=ModelFile(
        path="/home/dan/models/gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf",
        sha256=DRAFTER_SHA256,
        source=(
            "hf://google/gemma-4-12b-it-qat-assistant-mtp-gguf/"
            f"gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf@{DRAFTER_REVISION}"
        ),
        architecture="gemma4-assistant",
    ),
    spec_type="draft-mtp",
    spec_draft_n_max=3,
    spec_draft_ngl=99,
    ctx_size=262144,
    n_gpu_layers=99,
    cache_type_k="q8_0",
    cache_type_v="q8_0",
    parallel=1,
    flash_attn="on",
    cont_batching=True,
    jinja=True,
    port=8080,
    # A key made on the box at the first deploy (root and llama only may read it): loopback is not a
    # wall against a web page in a browser on the box. The smoke test reads the same file.
    api_key_file="generate",
    # The seed turned llama.cpp's fit precheck off: it refused this config, which fits (about
    # 12 GB at load, about 22 GB at a full 256k context). `gpubox plan` checks the fit instead.
    fit="off",
    smoke=SmokeThresholds(
        # Seed, single slot with MTP: ~178 tok/s at 8k context, ~121 tok/s sustained at 256k; MTP
        # off was ~95 tok/s. Below 100 the drafter is not paying for itself.
        min_tokens_per_second=100,
        # Seed: 60-67% acceptance at n-max 3; below 50% speculative decoding stops paying.
        min_acceptance=0.5,
        n_predict=256,
        runs=3,
    ),
)

# Speech on GPU 1, pinned by UUID like gemma4: whisper sees its GPU as device 0.
whisper = WhisperServer(
    name="whisper",
    gpus=(1,),
    model=ModelFile(
        path="/home/dan/models/ggml-large-v3-turbo.bin",
        sha256="2" * 64,  # `sha256sum` of your copy
        format="ggml-whisper",
        architecture="large-v3-turbo",  # large-v3 with 4 decoder layers; `large` would plan 1.9 GiB too much
    ),
    language="en",
    flash_attn=True,
    port=8090,
    smoke=TranscriptionSmoke(max_word_error_rate=0.2, max_real_time_factor=0.5),
)
piper = PiperServer(
    name="piper",
    gpus=(1,),  # --cuda: onnxruntime-gpu in piper's venv
    voice=ModelFile(path="/home/dan/models/piper/en_US-joe-medium.onnx", sha256="3" * 64, format="onnx"),
    voice_config=ModelFile(
        path="/home/dan/models/piper/en_US-joe-medium.onnx.json", sha256="4" * 64, format="json"
    ),
    port=5000,
    smoke=SpeechSmoke(),
)

gpu_boxes = [
    (
        "danarch4090",
        {
            "box": Box(
                llama_cpp=LlamaCppBuild(commit=LLAMA_CPP_COMMIT, cuda="on"),
                whisper_cpp=WhisperCppBuild(commit=WHISPER_CPP_COMMIT, cuda="on"),
                piper=PiperInstall(version="1.8.0"),
                huggingface=HUB,
                services=(gemma4, whisper, piper),
                expected_gpus=(
                    # The seed saw gemma4 at ~12 GB at load and ~22 GB after a full 256k session; the planner
                    # counts what is allocated at load (12.9 GB): the growth is kept free, so nothing else
                    # (whisper, piper) is planned onto GPU 0. See docs/vram-planner.md.
                    ExpectedGpu(index=0, name="NVIDIA GeForce RTX 4090", memory_total_mib=24564, reserve_mib=9500),
                    # The seed does not name its second card: an 8 GB one is assumed; set yours.
                    ExpectedGpu(index=1, name="second GPU (unnamed in the seed)", memory_total_mib=8192),
                ),
            ),
            # The box watches itself: Prometheus on loopback, the alert rules from the smoke thresholds
            # above and the VRAM plan; set webhook_url to be told (Alertmanager posts there).
            "monitoring": Monitoring(monitor="danarch4090"),
        },
    ),
]
