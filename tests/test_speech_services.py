"""The speech server types (whisper-server, piper) as specs, units, flag checks, and in a Box."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gpubox import (
    Box,
    ExpectedGpu,
    LlamaCppBuild,
    LlamaServer,
    ModelFile,
    PiperInstall,
    PiperServer,
    WhisperCppBuild,
    WhisperServer,
)
from gpubox.binaries import parse_usage_options, unsupported_flags
from gpubox.gpu import Gpu
from gpubox.models import ModelFormatError, check_head
from gpubox.servers.base import typed_flags
from gpubox.servers.piper import PIPER_SERVER_FLAGS
from gpubox.servers.whisper import WHISPER_SERVER_FLAGS
from gpubox.spec import problems_from
from gpubox.unit import render_unit

FIXTURES = Path(__file__).parent / "fixtures"
WHISPER_HELP = (FIXTURES / "whisper" / "whisper-server-help-f24588a.txt").read_text().splitlines()
PIPER_HELP = (FIXTURES / "piper" / "http-server-help-1.8.0.txt").read_text().splitlines()
TINY_EN = ModelFile(path="/srv/models/ggml-tiny.en.bin", sha256="a" * 64, format="ggml-whisper", architecture="tiny.en")
VOICE = ModelFile(path="/srv/voices/joe.onnx", sha256="b" * 64, format="onnx")
VOICE_CONFIG = ModelFile(path="/srv/voices/joe.onnx.json", sha256="c" * 64, format="json")
GGUF = ModelFile(path="/srv/models/m.gguf", sha256="d" * 64, architecture="llama")
H200 = [
    Gpu(
        index=index,
        uuid=uuid,
        name="NVIDIA H200",
        pci_bus_id=f"00000000:{index + 1:02x}:00.0",
        driver_version="580.95.05",
        memory_total_mib=143771,
        memory_used_mib=0,
        memory_free_mib=143771,
        compute_capability="9.0",
        minor_number=minor,
    )
    for index, uuid, minor in ((0, "GPU-aaaa", 3), (1, "GPU-bbbb", 5))
]


def whisper(**fields: Any) -> WhisperServer:
    return WhisperServer(name="whisper", model=TINY_EN, **fields)


def piper(**fields: Any) -> PiperServer:
    return PiperServer(name="piper", voice=VOICE, voice_config=VOICE_CONFIG, **fields)


def fields_refused(error: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {problem.field for problem in problems_from(error.value)}


# --- flag tables against the pinned binaries' --help ------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "help_lines"), [(WHISPER_SERVER_FLAGS, WHISPER_HELP), (PIPER_SERVER_FLAGS, PIPER_HELP)]
)
def test_every_spelling_in_a_table_is_in_the_pinned_help(flags: tuple[Any, ...], help_lines: list[str]) -> None:
    known = parse_usage_options(help_lines)
    assert [spelling for flag in flags for spelling in flag.spellings if not known.supports(spelling)] == []


def test_usage_options_read_both_layouts_and_not_descriptions() -> None:
    whisper_flags = parse_usage_options(WHISPER_HELP)
    assert {"-dtw", "--dtw", "--prompt", "--vad", "-vspd", "--tmp-dir", "-nfa"} <= set(whisper_flags.flags)
    piper_flags = parse_usage_options(PIPER_HELP)
    assert {"-m", "--model", "--noise_w", "--cuda", "--data-dir"} <= set(piper_flags.flags)
    assert "--length-scale" in piper_flags.flags and "LENGTH_SCALE" not in " ".join(piper_flags.flags)
    # the usage synopsis and wrapped descriptions name no option of their own
    assert parse_usage_options(["usage: x [-h] [--bogus BOGUS]", "                  --also-not"]).flags == ()


def test_a_flag_the_whisper_server_lacks_is_found() -> None:
    server = whisper(extra_args=("--no-such-flag", "1"))
    assert unsupported_flags(server.command_flags(), parse_usage_options(WHISPER_HELP)) == ["--no-such-flag"]


def test_typed_whisper_flags_are_refused_in_extra_args() -> None:
    with pytest.raises(ValidationError) as error:
        whisper(extra_args=("-t", "4", "--port=9"))
    assert fields_refused(error) == {"extra_args.0", "extra_args.2"}
    assert typed_flags(WhisperServer)["-nfa"] == "flash_attn"


# --- WhisperServer ---------------------------------------------------------------------------------


def test_whisper_argv_renders_every_set_field_in_table_order() -> None:
    server = whisper(threads=4, gpus=(1,), device=0, flash_attn=False)
    assert server.argv("/opt/whisper.cpp/current/whisper-server") == [
        "/opt/whisper.cpp/current/whisper-server",
        "--model", "/srv/models/ggml-tiny.en.bin",
        "--threads", "4",
        "--language", "en",
        "--no-flash-attn",
        "--device", "0",
        "--host", "127.0.0.1",
        "--port", "8090",
    ]  # fmt: skip


def test_convert_writes_ffmpegs_files_to_the_private_tmp() -> None:
    server = whisper(convert=True)
    assert server.tmp_dir == "/tmp" and server.host_programs() == ["ffmpeg"]
    assert server.argv("w")[-6:-4] == ["--tmp-dir", "/tmp"]
    with pytest.raises(ValidationError) as error:
        whisper(tmp_dir="/var/tmp")
    assert fields_refused(error) == {"tmp_dir"}


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"no_gpu": True, "gpus": (1,)}, "no_gpu"),
        ({"gpus": (1,), "device": 1}, "device"),
        ({"no_gpu": True, "device": 0}, "device"),
        ({"language": "de"}, "language"),
        ({"host": "0.0.0.0"}, "host"),
        ({"model": GGUF}, "model.format"),
    ],
)
def test_whisper_rules_name_the_field(fields: dict[str, Any], refused: str) -> None:
    arguments = {"name": "whisper", "model": TINY_EN, **fields}
    with pytest.raises(ValidationError) as error:
        WhisperServer(**arguments)
    assert refused in fields_refused(error)


def test_a_multilingual_model_may_hear_german() -> None:
    base = ModelFile(path="/m/ggml-base.bin", sha256="e" * 64, format="ggml-whisper", architecture="base")
    assert WhisperServer(name="w", model=base, language="de").language == "de"


def test_the_whisper_unit_restarts_whatever_the_exit_status_and_pins_its_gpu() -> None:
    text = render_unit(whisper(gpus=(1,)), "/opt/whisper.cpp/current/whisper-server", H200)
    assert "Restart=always\n" in text  # whisper-server exits 0 on a bad flag and when ffmpeg is missing
    assert "Environment=CUDA_VISIBLE_DEVICES=GPU-bbbb\n" in text
    assert "DeviceAllow=/dev/nvidia5 rw" in text and "/dev/nvidia3" not in text
    assert "ReadOnlyPaths=/srv/models\n" in text


# --- PiperServer -----------------------------------------------------------------------------------


def test_piper_runs_the_venvs_python_and_always_names_its_host() -> None:
    server = piper()
    assert server.argv(server.binary("/opt/piper")) == [
        "/opt/piper/current/bin/python3", "-m", "piper.http_server",
        "--model", "/srv/voices/joe.onnx",
        "--host", "127.0.0.1",  # piper's own default is 0.0.0.0
        "--port", "5000",
    ]  # fmt: skip
    assert server.help_file("/opt/piper") == "/opt/piper/current/piper.http_server.help"
    assert server.read_only_files() == ["/srv/voices/joe.onnx", "/srv/voices/joe.onnx.json"]


def test_piper_with_a_gpu_runs_on_it_and_says_so_in_argv() -> None:
    assert piper(gpus=(1,)).cuda is True
    assert "--cuda" in piper(gpus=(1,)).argv("p")
    with pytest.raises(ValidationError) as error:
        piper(gpus=(1,), cuda=False)
    assert fields_refused(error) == {"gpus"}
    with pytest.raises(ValidationError) as error:
        piper(cuda=True)
    assert fields_refused(error) == {"cuda"}


def test_piper_reads_its_config_beside_the_voice() -> None:
    elsewhere = ModelFile(path="/srv/voices/other.json", sha256="c" * 64, format="json")
    with pytest.raises(ValidationError) as error:
        PiperServer(name="p", voice=VOICE, voice_config=elsewhere)
    assert fields_refused(error) == {"voice_config.path"}


# --- the Box: a union of server types ------------------------------------------------------------------


def three_services(**box: Any) -> dict[str, Any]:
    llama = {"name": "gemma4", "model": GGUF.model_dump(), "gpus": (0,)}
    speech = {"name": "whisper", "type": "whisper-server", "model": TINY_EN.model_dump(), "gpus": (1,)}
    tts = {
        "name": "piper",
        "type": "piper",
        "voice": VOICE.model_dump(),
        "voice_config": VOICE_CONFIG.model_dump(),
        "gpus": (1,),
    }
    return {
        "llama_cpp": {"commit": "0" * 40},
        "whisper_cpp": {"commit": "1" * 40},
        "piper": {"version": "1.8.0"},
        "services": [llama, speech, tts],
        **box,
    }


def test_a_box_tells_its_services_apart_by_type() -> None:
    box = Box.model_validate(three_services())
    assert [type(service) for service in box.services] == [LlamaServer, WhisperServer, PiperServer]
    assert [model.path for _, model in box.models()] == [
        GGUF.path,
        TINY_EN.path,
        VOICE.path,
        VOICE_CONFIG.path,
    ]
    assert box.install_of(box.services[1]) == WhisperCppBuild(commit="1" * 40)
    assert box.install_of(box.services[2]) == PiperInstall(version="1.8.0")
    assert [build.PROJECT.name for build in box.builds()] == ["llama.cpp", "whisper.cpp"]


def test_a_service_without_its_install_names_the_box_field() -> None:
    with pytest.raises(ValidationError) as error:
        Box.model_validate(three_services(whisper_cpp=None, piper=None))
    assert fields_refused(error) == {"whisper_cpp", "piper"}


def test_a_refused_service_field_is_named_without_the_union_tag() -> None:
    data = three_services()
    data["services"][1]["device"] = 3
    with pytest.raises(ValidationError) as error:
        Box.model_validate(data)
    assert fields_refused(error) == {"services.1.device"}


def test_whisper_build_uses_its_own_project_options() -> None:
    from gpubox.build import cmake_configure_args

    args = cmake_configure_args(WhisperCppBuild(commit="1" * 40), "cuda", ["90"], ccache=False)
    assert "-DWHISPER_BUILD_EXAMPLES=ON" in args and "-DCMAKE_CUDA_ARCHITECTURES=90" in args
    assert not any(arg.startswith("-DLLAMA_") for arg in args)
    llama = cmake_configure_args(LlamaCppBuild(commit="0" * 40), "cpu", ccache=False)
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in llama and not any(arg.startswith("-DWHISPER_") for arg in llama)


def test_box_gpus_are_known() -> None:
    data = three_services(expected_gpus=[ExpectedGpu(index=0, name="4090", memory_total_mib=24564)])
    with pytest.raises(ValidationError) as error:
        Box.model_validate(data)
    assert fields_refused(error) == {"services.1.gpus", "services.2.gpus"}


# --- placement: the format of a file that is not a GGUF ----------------------------------------------


def test_a_ggml_whisper_head_is_checked_against_the_declared_size() -> None:
    head = (FIXTURES / "whisper" / "ggml-tiny.en.head.bin").read_bytes()
    check_head("ggml-whisper", "tiny.en", head, "m.bin")
    with pytest.raises(ModelFormatError, match=r"whisper tiny\.en model \(4 encoder layers, .*\), not base"):
        check_head("ggml-whisper", "base", head, "m.bin")
    with pytest.raises(ModelFormatError, match="not a ggml whisper model"):
        check_head("ggml-whisper", "tiny.en", b"GGUF" + head[4:], "m.bin")


def test_onnx_and_json_heads() -> None:
    check_head("onnx", None, b"\x08\x08\x12\x07pytorch", "v.onnx")
    with pytest.raises(ModelFormatError):
        check_head("onnx", None, b"GGUF\x03\x00", "v.onnx")
    check_head("json", None, b'\n {"audio": {"sample_rate": 22050}}', "v.onnx.json")
    with pytest.raises(ModelFormatError):
        check_head("json", None, b"<html>", "v.onnx.json")


def test_model_file_formats_need_the_right_architecture() -> None:
    with pytest.raises(ValidationError, match="needs architecture"):
        ModelFile(path="/m.gguf", sha256="a" * 64)
    with pytest.raises(ValidationError, match="size"):
        ModelFile(path="/m.bin", sha256="a" * 64, format="ggml-whisper", architecture="huge")
    with pytest.raises(ValidationError, match="no architecture"):
        ModelFile(path="/v.onnx", sha256="a" * 64, format="onnx", architecture="vits")


def test_a_placeholder_sha256_is_a_warning_naming_the_field() -> None:
    placeholder = TINY_EN.model_copy(update={"sha256": "2" * 64})
    server = WhisperServer(name="w", model=placeholder)
    ((field, why),) = server.warnings()
    assert field == "model.sha256" and "placeholder" in why and "sha256sum /srv/models/ggml-tiny.en.bin" in why
    assert whisper().warnings() == []  # a real-looking checksum says nothing
    assert [field for field, _ in piper().warnings()] == []


def test_two_installs_may_not_share_a_prefix() -> None:
    with pytest.raises(ValidationError) as error:
        Box.model_validate(three_services(whisper_cpp={"commit": "1" * 40, "prefix": "/opt/llama.cpp"}))
    assert fields_refused(error) == {"whisper_cpp.prefix"}


def test_the_deploy_asks_the_services_not_their_types() -> None:
    """What operations/ and deploys/ read of a service, through its methods (issue 22): the piper flavour, the
    round trip's pair, each service's flag-check read, its key file, its models' roles, whether it is smoked."""
    from operations import box_state, service, smoke

    services = three_services()
    services["services"][0].update(
        model_draft=GGUF.model_copy(update={"path": "/srv/models/d.gguf"}).model_dump(), api_key_file="generate",
        spec_type="draft-simple",
    )
    services["services"][1]["smoke"] = {}
    services["services"][2]["smoke"] = {}
    box = Box.model_validate(services)
    llama, stt, tts = box.services
    assert box_state.piper_flavor(box) == "cuda"
    assert box_state.piper_flavor(Box.model_validate(three_services(services=[services["services"][0]]))) == "cpu"
    assert smoke.round_trip_pair(box) == (tts, stt)
    assert [llama.model_role(model) for model in llama.models()] == ["Model", "Drafter"]
    assert llama.generated_key_file == "/etc/gpubox/keys/gemma4.key" and stt.generated_key_file is None
    assert not llama.smoke_tested and stt.smoke_tested and tts.smoke_tested
    assert stt.smoke_audio("/opt/whisper.cpp") == "/opt/whisper.cpp/src/samples/jfk.wav"
    reads = {fact.__name__: arguments for fact, arguments in service.facts_read(llama, "/opt/llama.cpp")}
    assert reads["LlamaServerFlags"] == {"path": "/opt/llama.cpp/current/llama-server"} and "File" in reads
    reads = {fact.__name__: arguments for fact, arguments in service.facts_read(stt, "/opt/whisper.cpp")}
    assert "ServerOptions" in reads and "LlamaServerFlags" not in reads and "File" not in reads


def test_whisper_is_ready_when_its_health_says_ok() -> None:
    assert whisper().ready(200, '{"status": "ok"}')
    assert not whisper().ready(200, '{"status": "loading model"}') and not whisper().ready(503, "")
