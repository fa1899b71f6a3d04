"""The test host's config: what inventory/testbed.py reads (the file GPUBOX_TESTBED_CONFIG names).

One typed model, written and read here only. A wrong key is refused by name (``extra="forbid"``),
like the product's specs; the product's own rules (a bad sha256, a bad spec type, a monitor that is
not in the inventory) stay the product's to refuse, so the values here are plain and the inventory
turns them into ``gpubox.Box`` and ``gpubox.monitoring.spec.Monitoring``.

A change to an existing config (``scripts/testbed_config.py KEY=VALUE``, a test's overrides) is
applied on top of it: the ports it picked and the changes made before are kept.

This module stays light (pydantic and the standard library): every deploy on the test host imports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PATH = Path(".cache/testbed.json")
ENVIRONMENT_VARIABLE = "GPUBOX_TESTBED_CONFIG"
Port = int

# The speech keys come as a set: a config has all the required ones of a service, or none.
WHISPER_KEYS = ("whisper_repo", "whisper_commit", "whisper_model_sha256", "whisper_model_source", "whisper_port")
PIPER_KEYS = (
    "piper_version", "piper_wheelhouse", "voice_sha256", "voice_source", "voice_config_sha256",
    "voice_config_source", "piper_port",
)  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetHost(_Strict):
    """One more host of the fleet: its connection, and the keys it changes from the first host's."""

    host_name: str
    host_data: dict[str, Any]
    port: Port | None = None
    node_exporter_port: Port | None = None
    agent_port: Port | None = None
    api_key_file: str | None = None


class TestbedConfig(_Strict):
    """The test host's box, as inventory/testbed.py builds it (the seed's shape, on the CPU).

    + host_name, host_data: the pyinfra host (its SSH connection)
    + repo, commit, prefix, ccache_dir, jobs: the llama.cpp build
    + port, model_*, drafter_*, spec_type, spec_draft_n_max, api_key_file: the LLM service (gemma4)
    + min_tokens_per_second, min_acceptance: its smoke thresholds
    + whisper_*, piper_*, voice_*: the speech services (all of a service's required keys, or none)
    + hf_endpoint, hf_token_file: where hf:// sources come from
    + node_exporter_port, agent_port, gpu_metrics_interval_s, monitoring: what watches the fleet
    + fleet: more hosts, each changing some keys of the first
    """

    __test__ = False  # not a pytest test class

    host_name: str
    host_data: dict[str, Any]
    # llama.cpp
    repo: str
    commit: str
    prefix: str = "/opt/llama.cpp"
    ccache_dir: str | None = None
    jobs: int | None = Field(default=None, ge=1)
    # the LLM: SmolLM2 by default; the tests switch to a tiny random Gemma 4 pair
    port: Port
    model_path: str = "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    model_sha256: str
    model_source: str
    model_architecture: str = "llama"
    drafter_path: str = "/srv/models/drafter/SmolLM2-135M-Instruct.Q4_1.gguf"
    drafter_sha256: str | None = None  # None: the target's (SmolLM2 drafting for itself)
    drafter_source: str | None = None
    drafter_architecture: str = "llama"
    spec_type: str = "draft-simple"
    spec_draft_n_max: int = 3
    api_key_file: str | None = None
    min_tokens_per_second: float = 1.0
    min_acceptance: float | None = 0.5
    # whisper-server
    whisper_repo: str | None = None
    whisper_commit: str | None = None
    whisper_prefix: str = "/opt/whisper.cpp"
    whisper_model_path: str = "/srv/models/whisper/ggml-tiny.en.bin"
    whisper_model_sha256: str | None = None
    whisper_model_source: str | None = None
    whisper_port: Port | None = None
    whisper_extra_args: tuple[str, ...] = ()
    # tiny.en reads jfk.wav's 11 s in 1-2 s alone on 2 cores, 18 s beside two llama.cpp builds (RTF 1.65):
    # the smoke asserts it hears, the bench measures speed
    whisper_max_rtf: float = 3.0
    whisper_max_wer: float = 0.2
    # piper
    piper_version: str | None = None
    piper_wheelhouse: str | None = None
    voice_path: str = "/srv/models/piper/en_US-joe-medium.onnx"
    voice_sha256: str | None = None
    voice_source: str | None = None
    voice_config_sha256: str | None = None
    voice_config_source: str | None = None
    piper_port: Port | None = None
    # Hugging Face
    hf_endpoint: str | None = None
    hf_token_file: str | None = None
    # monitoring
    node_exporter_port: Port = 9100
    agent_port: Port = 9095
    gpu_metrics_interval_s: int = 15
    monitoring: dict[str, Any] | None = None  # gpubox.monitoring.spec.Monitoring's fields
    fleet: tuple[FleetHost, ...] = ()

    @model_validator(mode="after")
    def _speech_keys_together(self) -> Self:
        for service, keys in (("whisper", WHISPER_KEYS), ("piper", PIPER_KEYS)):
            given = [key for key in keys if getattr(self, key) is not None]
            if given and len(given) != len(keys):
                missing = [key for key in keys if key not in given]
                raise ValueError(f"{service}: {', '.join(missing)} missing (give all of {', '.join(keys)}, or none)")
        return self

    @property
    def has_whisper(self) -> bool:
        return self.whisper_commit is not None

    @property
    def has_piper(self) -> bool:
        return self.piper_version is not None

    def hosts(self) -> list[TestbedConfig]:
        """The first host, then each fleet host: the first's keys with the fleet entry's own."""
        first = self.model_copy(update={"fleet": ()})
        return [self] + [
            first.model_copy(update=extra.model_dump(exclude_unset=True)) for extra in self.fleet
        ]

    def changed(self, **overrides: Any) -> TestbedConfig:
        """This config with ``overrides`` applied (validated: a wrong key or value is refused by name)."""
        return type(self).model_validate({**self.model_dump(exclude_unset=True), **overrides})

    def write(self, path: Path) -> None:
        """Write the config whole: a reader sees the old file or the new one, never a part."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.tmp")
        staged.write_text(self.model_dump_json(indent=2, exclude_unset=True) + "\n")
        os.replace(staged, path)

    @classmethod
    def read(cls, path: Path) -> TestbedConfig:
        return cls.model_validate_json(path.read_text())


def config_path() -> Path:
    """The file inventory/testbed.py reads: $GPUBOX_TESTBED_CONFIG, else .cache/testbed.json."""
    return Path(os.environ.get(ENVIRONMENT_VARIABLE, str(DEFAULT_PATH)))


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments (VALUE as JSON, or a bare string), e.g. ``spec_draft_n_max=2``."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not equals or not key:
            raise ValueError(f"{assignment!r}: give KEY=VALUE, e.g. spec_draft_n_max=2")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides
