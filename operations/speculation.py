"""Checks the surgical drafter redeploy makes on the host before it touches anything."""

from __future__ import annotations

from pyinfra import host, state
from pyinfra.api import OperationError, operation
from pyinfra.facts.files import Sha256File

from facts.llamacpp import LlamaServerFlags, LlamaServerVersion
from gpubox import llamacpp as records
from gpubox.llamacpp import check_spec_type_supported
from gpubox.spec import LlamaServer, ModelFile
from gpubox.unit import binary_path

from .models import check_remote_architecture


@operation()
def supported(server: LlamaServer, prefix: str):  # type: ignore[no-untyped-def]
    """The installed llama-server's `--help` lists the service's spec type."""
    binary = binary_path(prefix)
    flags = host.get_fact(LlamaServerFlags, path=binary)
    if flags is None:
        raise OperationError(f"no llama-server at {binary}: run the full deploy first")
    # The records, or their JSON form (a pyinfra-testing fixture): both are validated into records.
    flags = records.ServerFlags.model_validate(flags)
    version = host.get_fact(LlamaServerVersion, path=binary)
    if version is not None:
        version = records.LlamaServerVersion.model_validate(version)
    try:
        check_spec_type_supported(server.spec_type, flags, str(version))
    except ValueError as error:
        raise OperationError(str(error)) from error
    host.noop(f"{binary} ({version}) lists --spec-type {server.spec_type}")
    yield from ()


@operation()
def drafter_architecture(model: ModelFile):  # type: ignore[no-untyped-def]
    """The drafter on the host is a GGUF of the declared architecture (e.g. gemma4-assistant)."""
    if not state.is_executing and host.get_fact(Sha256File, path=model.path) != model.sha256:
        host.noop(f"{model.path} is not placed yet: its architecture is checked once it is")
        return
    check_remote_architecture(model.path, model.architecture)
    host.noop(f"{model.path} is a {model.architecture} GGUF")
    yield from ()
