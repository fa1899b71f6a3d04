"""Checks the surgical drafter redeploy makes on the host before it touches anything."""

from __future__ import annotations

from pyinfra import host, state
from pyinfra.api import OperationError, operation

from facts.llamacpp import LlamaServerFlags, LlamaServerVersion
from gpubox import binaries as records
from gpubox.binaries import check_spec_type_supported
from gpubox.box import AnyService
from gpubox.spec import ModelFile

from .models import check_remote_architecture, has_sha256


@operation()
def supported(server: AnyService, prefix: str):  # type: ignore[no-untyped-def]
    """
    Refuse unless the installed llama-server's ``--help`` lists the service's spec type.

    + server: the service (a llama-server: one that ``drafts``) whose ``spec_type`` is looked up
    + prefix: the llama.cpp build prefix; its ``current/llama-server`` is asked

    **Example:**

    .. code:: python

        speculation.supported(
            name="llama-server supports --spec-type draft-mtp", server=server, prefix="/opt/llama.cpp"
        )
    """
    binary = server.binary(prefix)
    flags = host.get_fact(LlamaServerFlags, path=binary)
    if flags is None:
        raise OperationError(f"no llama-server at {binary}: run the full deploy first")
    # The records, or their JSON form (a pyinfra-testing fixture): both are validated into records.
    flags = records.ServerFlags.model_validate(flags)
    version = host.get_fact(LlamaServerVersion, path=binary)
    if version is not None:
        version = records.ServerVersion.model_validate(version)
    try:
        check_spec_type_supported(server.spec_type, flags, str(version))
    except ValueError as error:
        raise OperationError(str(error)) from error
    host.noop(f"{binary} ({version}) lists --spec-type {server.spec_type}")
    yield from ()


@operation()
def drafter_architecture(model: ModelFile):  # type: ignore[no-untyped-def]
    """
    Refuse unless the drafter on the host is a GGUF of its declared architecture.

    + model: the drafter's ``ModelFile`` (``architecture``: e.g. ``gemma4-assistant``)

    **Example:**

    .. code:: python

        speculation.drafter_architecture(name="Drafter is a gemma4-assistant GGUF", model=server.model_draft)
    """
    # Planning (a dry run, or the check before a run that asks to confirm): the drafter may not be
    # placed yet. The verified stamp answers for an unchanged file; else it is hashed once per run.
    if not state.is_executing and not has_sha256(model):
        host.noop(f"{model.path} is not placed yet: its architecture is checked once it is")
        return
    check_remote_architecture(model.path, model.architecture)
    host.noop(f"{model.path} is a {model.architecture} GGUF")
    yield from ()
