"""Every Box rule: a good spec passes, the broken one is refused by field name with a fix."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, SmokeThresholds
from gpubox.spec import problems_from

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
TARGET = {"path": "/srv/models/target.gguf", "sha256": "a" * 64, "architecture": "gemma4"}
DRAFTER = {"path": "/srv/models/drafter.gguf", "sha256": "b" * 64, "architecture": "gemma4-assistant"}


def server(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "gemma4",
        "gpus": [0],
        "model": TARGET,
        "model_draft": DRAFTER,
        "spec_type": "draft-mtp",
        "spec_draft_n_max": 3,
        "ctx_size": 8192,
        "cache_type_k": "q8_0",
        "cache_type_v": "q8_0",
        "flash_attn": "on",
        "parallel": 1,
    }
    spec.update(overrides)
    return spec


def refused_fields(model: type[Any], data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return {problem.field: problem.message for problem in problems_from(caught.value)}


def test_good_server_passes() -> None:
    spec = LlamaServer.model_validate(server())
    assert spec.unit_name == "gemma4.service"
    assert spec.model_draft is not None


def test_models_are_frozen_and_forbid_unknown_fields() -> None:
    spec = LlamaServer.model_validate(server())
    with pytest.raises(ValidationError):
        spec.parallel = 4  # type: ignore[misc]
    fields = refused_fields(LlamaServer, server(n_parallel=4))
    assert "n_parallel" in fields


@pytest.mark.parametrize("spec_type", ["draft-mtp", "draft-simple", "ngram-simple"])
def test_drafting_with_parallel_is_the_trap(spec_type: str) -> None:
    draft = DRAFTER if spec_type.startswith("draft-") else None
    fields = refused_fields(
        LlamaServer, server(spec_type=spec_type, model_draft=draft, parallel=4, spec_draft_n_max=None)
    )
    assert set(fields) == {"parallel"}
    assert "parallel trap" in fields["parallel"] and "allow_parallel_speculation" in fields["parallel"]


def test_parallel_speculation_allowed_explicitly() -> None:
    spec = LlamaServer.model_validate(server(parallel=4, allow_parallel_speculation=True))
    assert spec.parallel == 4


def test_parallel_without_drafting_passes() -> None:
    spec = LlamaServer.model_validate(
        server(spec_type="none", model_draft=None, spec_draft_n_max=None, parallel=4)
    )
    assert spec.parallel == 4


def test_draft_types_need_model_draft() -> None:
    fields = refused_fields(LlamaServer, server(model_draft=None))
    assert set(fields) == {"model_draft"}
    assert "set model_draft" in fields["model_draft"]


def test_ngram_types_must_not_have_model_draft() -> None:
    fields = refused_fields(LlamaServer, server(spec_type="ngram-mod"))
    assert set(fields) == {"model_draft"}
    assert "remove model_draft" in fields["model_draft"]


def test_model_draft_without_spec_type_is_refused() -> None:
    fields = refused_fields(LlamaServer, server(spec_type="none", spec_draft_n_max=None))
    assert set(fields) == {"spec_type"}
    assert "never drafts" in fields["spec_type"]


def test_draft_settings_without_drafting_are_refused() -> None:
    fields = refused_fields(
        LlamaServer, server(spec_type="none", model_draft=None, spec_draft_ngl=99, spec_draft_n_max=3)
    )
    assert set(fields) == {"spec_draft_ngl", "spec_draft_n_max"}


@pytest.mark.parametrize("cache_type_v", ["q8_0", "q4_0", "q5_1", "iq4_nl"])
@pytest.mark.parametrize("flash_attn", ["off", "auto"])
def test_quantized_v_cache_needs_flash_attention(cache_type_v: str, flash_attn: str) -> None:
    fields = refused_fields(LlamaServer, server(cache_type_v=cache_type_v, flash_attn=flash_attn))
    assert set(fields) == {"flash_attn"}
    assert "flash_attn='on'" in fields["flash_attn"]


def test_unquantized_v_cache_without_flash_attention_passes() -> None:
    spec = LlamaServer.model_validate(server(cache_type_v="f16", flash_attn="off"))
    assert spec.flash_attn == "off"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spec_type", "mtp"),
        ("spec_type", "draft"),
        ("cache_type_k", "q8"),
        ("cache_type_v", "fp16"),
        ("flash_attn", True),
        ("fit", "auto"),
    ],
)
def test_only_values_the_pinned_llama_cpp_accepts(field: str, value: object) -> None:
    fields = refused_fields(LlamaServer, server(**{field: value}))
    assert field in fields


def test_ctx_size_divisible_by_parallel() -> None:
    fields = refused_fields(
        LlamaServer,
        server(spec_type="none", model_draft=None, spec_draft_n_max=None, parallel=3, ctx_size=8192),
    )
    assert set(fields) == {"ctx_size"}
    assert "multiple of 3" in fields["ctx_size"]


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_range(port: int) -> None:
    assert "port" in refused_fields(LlamaServer, server(port=port))


@pytest.mark.parametrize("name", ["../etc", "gemma4.service", "a b", "", "-x"])
def test_unit_name_safe_for_systemd(name: str) -> None:
    assert "name" in refused_fields(LlamaServer, server(name=name))


@pytest.mark.parametrize("user", ["root", "Dan", "a b"])
def test_dedicated_user(user: str) -> None:
    assert "user" in refused_fields(LlamaServer, server(user=user))


def test_paths_absolute_and_sha256_hex() -> None:
    fields = refused_fields(LlamaServer, server(model={**TARGET, "path": "models/t.gguf", "sha256": "abc"}))
    assert "must be an absolute path" in fields["model.path"]
    assert "64 hex" in fields["model.sha256"]


def test_model_source_is_https_or_controller_file() -> None:
    assert ModelFile.model_validate({**TARGET, "source": "https://example.org/t.gguf"}).source_is_url
    assert not ModelFile.model_validate({**TARGET, "source": "models/t.gguf"}).source_is_url
    for bad in ("http://example.org/t.gguf", "ftp://example.org/t.gguf"):
        assert "source" in refused_fields(ModelFile, {**TARGET, "source": bad})


def test_remote_listener_needs_api_key_file() -> None:
    fields = refused_fields(LlamaServer, server(host="0.0.0.0"))
    assert set(fields) == {"api_key_file", "allow_from"}
    spec = LlamaServer.model_validate(
        server(host="0.0.0.0", api_key_file="/etc/llama/keys", allow_from=["192.168.1.0/24"])
    )
    assert spec.api_key_file == "/etc/llama/keys"
    assert LlamaServer.model_validate(server(host="::1")).host == "::1"


def test_extra_args_cannot_bypass_typed_fields() -> None:
    fields = refused_fields(LlamaServer, server(extra_args=["--alias", "x", "-np", "4", "--api-key=secret"]))
    assert set(fields) == {"extra_args.2", "extra_args.4"}
    assert "set parallel" in fields["extra_args.2"]


def test_min_acceptance_needs_a_drafter() -> None:
    smoke = {"min_tokens_per_second": 10, "min_acceptance": 0.5}
    fields = refused_fields(
        LlamaServer, server(spec_type="none", model_draft=None, spec_draft_n_max=None, smoke=smoke)
    )
    assert set(fields) == {"smoke.min_acceptance"}
    with pytest.raises(ValidationError):
        SmokeThresholds(min_tokens_per_second=10, min_acceptance=1.5)


def test_build_commit_must_be_full_sha() -> None:
    assert LlamaCppBuild(commit=COMMIT.upper()).commit == COMMIT
    fields = refused_fields(LlamaCppBuild, {"commit": "0c1e57098"})
    assert "full 40-hex sha" in fields["commit"]


def test_build_options() -> None:
    assert LlamaCppBuild(commit=COMMIT, cuda_architectures=("89", "90a")).cuda_architectures == ("89", "90a")
    assert "cuda_architectures" in refused_fields(LlamaCppBuild, {"commit": COMMIT, "cuda_architectures": ["8.9"]})
    assert "prefix" in refused_fields(LlamaCppBuild, {"commit": COMMIT, "prefix": "opt/llama"})
    assert "targets" in refused_fields(LlamaCppBuild, {"commit": COMMIT, "targets": ["llama-bench"]})
    assert "cuda" in refused_fields(LlamaCppBuild, {"commit": COMMIT, "cuda": "yes"})


def box(services: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    return {"llama_cpp": {"commit": COMMIT}, "services": services, **overrides}


def test_box_ports_and_names_unique() -> None:
    other = server(name="other", model=DRAFTER | {"path": "/srv/models/o.gguf"}, spec_type="none",
                   model_draft=None, spec_draft_n_max=None)
    fields = refused_fields(Box, box([server(), other | {"name": "gemma4"}]))
    assert set(fields) == {"services.1.name", "services.1.port"}
    assert Box.model_validate(box([server(), other | {"port": 8081}])).service("other").port == 8081


def test_box_gpus_must_be_expected() -> None:
    gpus = [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "memory_total_mib": 24564}]
    assert Box.model_validate(box([server()], expected_gpus=gpus)).expected_gpus is not None
    fields = refused_fields(Box, box([server(gpus=[1])], expected_gpus=gpus))
    assert "not among expected_gpus" in fields["services.0.gpus"]


def test_box_one_checksum_per_model_path() -> None:
    other = server(name="other", port=8081, model=TARGET | {"sha256": "c" * 64}, spec_type="none",
                   model_draft=None, spec_draft_n_max=None)
    fields = refused_fields(Box, box([server(), other]))
    assert set(fields) == {"services.1.model.sha256"}


def test_box_needs_a_service() -> None:
    assert "services" in refused_fields(Box, box([]))


# ----------------------------------------------------------------------------- draft cache types, batch sizes

SMOL = {"path": "/srv/models/smol.gguf", "sha256": "c" * 64, "architecture": "llama"}


def _help_flags() -> frozenset[str]:
    from pathlib import Path

    from gpubox.binaries import parse_server_help

    text = (Path(__file__).parent / "fixtures/llamacpp/server-help-0c1e57098.txt").read_text()
    return frozenset(parse_server_help(text.splitlines()).flags)


def test_draft_cache_types_and_batch_sizes_render_only_when_set() -> None:
    plain = LlamaServer.model_validate(server(model=SMOL, model_draft=SMOL, spec_type="draft-simple")).argv("ls")
    for flag in ("--spec-draft-type-k", "--spec-draft-type-v", "--batch-size", "--ubatch-size"):
        assert flag not in plain
    argv = LlamaServer.model_validate(
        server(
            model=SMOL, model_draft=SMOL, spec_type="draft-simple", spec_draft_type_k="q8_0",
            spec_draft_type_v="q4_0", batch_size=2048, ubatch_size=1024,
        )  # fmt: skip
    ).argv("ls")
    assert argv[argv.index("--spec-draft-type-k") + 1] == "q8_0"
    assert argv[argv.index("--spec-draft-type-v") + 1] == "q4_0"
    assert argv[argv.index("--batch-size") + 1] == "2048"
    assert argv[argv.index("--ubatch-size") + 1] == "1024"


def test_the_new_flags_and_aliases_are_the_pinned_binarys() -> None:
    help_flags = _help_flags()
    for field_name, spellings in {
        "spec_draft_type_k": ("--spec-draft-type-k", "-ctkd", "--cache-type-k-draft"),
        "spec_draft_type_v": ("--spec-draft-type-v", "-ctvd", "--cache-type-v-draft"),
        "batch_size": ("--batch-size", "-b"),
        "ubatch_size": ("--ubatch-size", "-ub"),
    }.items():
        for spelling in spellings:
            assert spelling in help_flags, spelling
            fields = refused_fields(LlamaServer, server(extra_args=["--alias", "x", spelling, "512"]))
            assert set(fields) == {"extra_args.2"}
            assert f"set {field_name} instead" in fields["extra_args.2"]


@pytest.mark.parametrize("field_name", ["spec_draft_type_k", "spec_draft_type_v"])
def test_draft_cache_types_need_a_drafter(field_name: str) -> None:
    fields = refused_fields(
        LlamaServer, server(spec_type="none", model_draft=None, spec_draft_n_max=None, **{field_name: "f16"})
    )
    assert set(fields) == {field_name}
    assert "no model_draft" in fields[field_name]


@pytest.mark.parametrize("flash_attn", ["off", "auto"])
def test_quantized_draft_v_cache_needs_flash_attention(flash_attn: str) -> None:
    # llama_init_from_model runs the same check on the drafter's context, with its V type
    fields = refused_fields(
        LlamaServer,
        server(cache_type_k="f16", cache_type_v="f16", flash_attn=flash_attn, spec_draft_type_v="q8_0"),
    )
    assert set(fields) == {"flash_attn"}
    assert "spec_draft_type_v='q8_0'" in fields["flash_attn"]
    spec = LlamaServer.model_validate(
        server(cache_type_k="f16", cache_type_v="f16", flash_attn="off", spec_draft_type_k="q8_0")
    )  # a quantized K alone needs no flash attention
    assert spec.spec_draft_type_k == "q8_0"


@pytest.mark.parametrize(("field_name", "value"), [("spec_draft_type_k", "q8"), ("ubatch_size", 0), ("batch_size", 0)])
def test_new_fields_take_only_valid_values(field_name: str, value: object) -> None:
    assert field_name in refused_fields(LlamaServer, server(**{field_name: value}))
