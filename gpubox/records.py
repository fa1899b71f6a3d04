"""The base of every fact record: what a fact returns is an immutable, JSON-encodable pydantic model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Base of gpubox's fact records: immutable, strict, and JSON-encodable by pyinfra.

    pyinfra's CLI (``pyinfra @host fact ...``) and pyinfra-testing serialise fact data with
    ``pyinfra_cli.util.json_encode``, which calls ``to_json()`` on objects it does not know.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
