"""The local test host's box: the seed's service shape, on the CPU with SmolLM2 drafting for itself.

`scripts/demo` and the e2e tests boot a systemd-nspawn host (tests.testbed) and write its
connection, the llama.cpp repo and commit, the model, and the knobs the tests turn (drafter
settings, thresholds, checksums) to the JSON file named by GPUBOX_TESTBED_CONFIG: a typed
tests.testbed.config.TestbedConfig, which refuses a wrong key by name. A config with `fleet` (more
hosts: each entry's keys override the first host's) and `monitoring` (a gpubox.monitoring.Monitoring)
is a fleet to watch (deploys/observability.py).

The test host has no GPU, and says so: the LLM offloads no layers (`n_gpu_layers=0`), whisper runs
with `no_gpu=True` and piper without CUDA; no service pins `gpus`.
"""

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
from gpubox.monitoring.spec import Monitoring
from gpubox.spec import HostMonitoring
from tests.testbed.config import TestbedConfig, config_path

_config = TestbedConfig.read(config_path())


def _box(config: TestbedConfig) -> Box:
    # The target: SmolLM2 by default; the tests switch to a tiny random Gemma 4 pair (model_* keys).
    target = ModelFile(
        path=config.model_path,
        sha256=config.model_sha256,
        source=config.model_source,
        architecture=config.model_architecture,
    )
    # SmolLM2 drafting for itself: the seed's drafter shape (a separate GGUF, its own path).
    drafter = ModelFile(
        path=config.drafter_path,
        sha256=config.drafter_sha256 or config.model_sha256,
        source=config.drafter_source or config.model_source,
        architecture=config.drafter_architecture,
    )

    gemma4 = LlamaServer(
        name="gemma4",
        gpus=(),
        model=target,
        model_draft=drafter,
        spec_type=config.spec_type,
        spec_draft_n_max=config.spec_draft_n_max,
        ctx_size=4096,
        n_gpu_layers=0,  # no GPU here: every layer on the CPU, said rather than implied
        cache_type_k="q8_0",
        cache_type_v="q8_0",
        parallel=1,
        flash_attn="on",
        cont_batching=True,
        jinja=True,
        port=config.port,
        api_key_file=config.api_key_file,
        fit="off",
        smoke=SmokeThresholds(
            # Honest for a shared 2-core CPU: SmolLM2 drafting for itself decoded at 47-58 tok/s alone
            # (101-121 without the drafter) and at 2-6 tok/s beside a parallel build. The smoke asserts it
            # serves and drafts; speed is the bench's to measure.
            min_tokens_per_second=config.min_tokens_per_second,
            # None for the random-weight Gemma 4 pair: it drafts, but nothing is accepted.
            min_acceptance=config.min_acceptance,
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
    if config.has_whisper:
        speech["whisper_cpp"] = WhisperCppBuild(
            repo=config.whisper_repo,
            commit=config.whisper_commit,
            prefix=config.whisper_prefix,
            cuda="auto",
            ccache_dir=config.ccache_dir,
            jobs=config.jobs,
        )
        services.append(
            WhisperServer(
                name="whisper",
                model=ModelFile(
                    path=config.whisper_model_path,
                    sha256=config.whisper_model_sha256,
                    source=config.whisper_model_source,
                    format="ggml-whisper",
                    architecture="tiny.en",
                ),
                threads=2,
                no_gpu=True,
                port=config.whisper_port,
                extra_args=config.whisper_extra_args,
                smoke=TranscriptionSmoke(
                    # a shared 2-core CPU: tiny.en took ~1-2 s for jfk.wav's 11 s alone, 18 s under load
                    max_real_time_factor=config.whisper_max_rtf,
                    max_word_error_rate=config.whisper_max_wer,
                ),
            )
        )
    if config.has_piper:
        speech["piper"] = PiperInstall(version=config.piper_version, wheelhouse=config.piper_wheelhouse)
        voice = config.voice_path
        services.append(
            PiperServer(
                name="piper",
                voice=ModelFile(
                    path=voice, sha256=config.voice_sha256, source=config.voice_source, format="onnx"
                ),
                voice_config=ModelFile(
                    path=f"{voice}.json",
                    sha256=config.voice_config_sha256,
                    source=config.voice_config_source,
                    format="json",
                ),
                port=config.piper_port,
                cuda=False,
                smoke=SpeechSmoke(),
            )
        )

    return Box(
        **speech,  # type: ignore[arg-type]
        services=tuple(services),
        llama_cpp=LlamaCppBuild(
            repo=config.repo,
            commit=config.commit,
            prefix=config.prefix,
            cuda="auto",
            targets=("llama-server",),
            ccache_dir=config.ccache_dir,
            jobs=config.jobs,
        ),
        # hf:// model sources (the gated-download tests point the endpoint at a local HTTPS hub)
        huggingface=(
            HuggingFace(endpoint=config.hf_endpoint, token_file=config.hf_token_file)
            if config.hf_endpoint
            else None
        ),
        monitoring=HostMonitoring(
            node_exporter_port=config.node_exporter_port,
            agent_port=config.agent_port,
            gpu_metrics_interval_s=config.gpu_metrics_interval_s,
        ),
    )


# The first host, then the fleet's others (each a dict of the keys it changes: host_name, host_data, port, ...).
_monitoring = {"monitoring": Monitoring(**_config.monitoring)} if _config.monitoring is not None else {}
testbed = [(config.host_name, {**config.host_data, "box": _box(config), **_monitoring}) for config in _config.hosts()]
