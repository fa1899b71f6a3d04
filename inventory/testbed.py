"""The local test host's box: the seed's service shape, on the CPU with SmolLM2 drafting for itself.

`scripts/demo` and the e2e tests boot a systemd-nspawn host (tests.testbed) and write its
connection, the llama.cpp repo and commit, the model, and the knobs the tests turn (drafter
settings, thresholds, checksums) to the JSON file named by GPUBOX_TESTBED_CONFIG. A config with
`fleet` (more hosts: each entry's keys override the first host's) and `monitoring` (a
gpubox.monitoring.Monitoring) is a fleet to watch (deploys/observability.py).
"""

import json
import os

from gpubox import (
    Box,
    HuggingFace,
    LlamaCppBuild,
    LlamaServer,
    ModelFile,
    PiperInstall,
    PiperServer,
    SmokeThresholds,
    SpeechSmoke,
    TranscriptionSmoke,
    WhisperCppBuild,
    WhisperServer,
)
from gpubox.monitoring.spec import HostMonitoring, Monitoring

with open(os.environ.get("GPUBOX_TESTBED_CONFIG", ".cache/testbed.json")) as config_file:
    _config = json.load(config_file)


def _box(config: dict) -> Box:
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

    # The speech services of the seed's box, when the test host has their assets: whisper.cpp's
    # whisper-server (built from a local repo) with Whisper tiny.en, and piper with the joe voice
    # (installed from the controller's wheelhouse). On the CPU here; GPU 1 on the seed's box.
    speech: dict[str, object] = {}
    services: list[LlamaServer | WhisperServer | PiperServer] = [gemma4]
    if "whisper_commit" in config:
        speech["whisper_cpp"] = WhisperCppBuild(
            repo=config["whisper_repo"],
            commit=config["whisper_commit"],
            prefix=config.get("whisper_prefix", "/opt/whisper.cpp"),
            cuda="auto",
            ccache_dir=config.get("ccache_dir"),
            jobs=config.get("jobs"),
        )
        services.append(
            WhisperServer(
                name="whisper",
                model=ModelFile(
                    path=config.get("whisper_model_path", "/srv/models/whisper/ggml-tiny.en.bin"),
                    sha256=config["whisper_model_sha256"],
                    source=config["whisper_model_source"],
                    format="ggml-whisper",
                    architecture="tiny.en",
                ),
                threads=2,
                port=config["whisper_port"],
                extra_args=tuple(config.get("whisper_extra_args", ())),
                smoke=TranscriptionSmoke(
                    # a shared 2-core CPU: tiny.en took ~1-2 s for jfk.wav's 11 s alone
                    max_real_time_factor=config.get("whisper_max_rtf", 1.0),
                    max_word_error_rate=config.get("whisper_max_wer", 0.2),
                ),
            )
        )
    if "piper_version" in config:
        speech["piper"] = PiperInstall(version=config["piper_version"], wheelhouse=config["piper_wheelhouse"])
        voice = config.get("voice_path", "/srv/models/piper/en_US-joe-medium.onnx")
        services.append(
            PiperServer(
                name="piper",
                voice=ModelFile(
                    path=voice, sha256=config["voice_sha256"], source=config["voice_source"], format="onnx"
                ),
                voice_config=ModelFile(
                    path=f"{voice}.json",
                    sha256=config["voice_config_sha256"],
                    source=config["voice_config_source"],
                    format="json",
                ),
                port=config["piper_port"],
                smoke=SpeechSmoke(),
            )
        )

    return Box(
        **speech,  # type: ignore[arg-type]
        services=tuple(services),
        llama_cpp=LlamaCppBuild(
            repo=config["repo"],
            commit=config["commit"],
            prefix=config.get("prefix", "/opt/llama.cpp"),
            cuda="auto",
            targets=("llama-server",),
            ccache_dir=config.get("ccache_dir"),
            jobs=config.get("jobs"),
        ),
        # hf:// model sources (the gated-download tests point the endpoint at a local HTTPS hub)
        huggingface=(
            HuggingFace(endpoint=config["hf_endpoint"], token_file=config.get("hf_token_file"))
            if "hf_endpoint" in config
            else None
        ),
        monitoring=HostMonitoring(
            node_exporter_port=config.get("node_exporter_port", 9100),
            agent_port=config.get("agent_port", 9095),
            gpu_metrics_interval_s=config.get("gpu_metrics_interval_s", 15),
        ),
    )


# The first host, then the fleet's others (each a dict of the keys it changes: host_name, host_data, port, ...).
_hosts = [_config, *({**_config, **extra} for extra in _config.get("fleet", ()))]
_monitoring = {"monitoring": Monitoring(**_config["monitoring"])} if "monitoring" in _config else {}
testbed = [(config["host_name"], {**config["host_data"], "box": _box(config), **_monitoring}) for config in _hosts]
