"""The registry of server types: the one place a ``Box`` learns which services it can run.

Each server type registers itself (its room calls :func:`register_server_type` at import); a type
defined outside the product registers the same way, from the inventory, before the inventory builds
its ``Box``. ``gpubox check``, ``gpubox plan`` and a ``pyinfra`` deploy each import the inventory, so
each process sees what it registers. A ``Box``'s ``services`` are validated through
:func:`validate_service`: a discriminated union (by ``type``) of the types registered at that
moment, so registering later still counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar, Union

from pydantic import Discriminator, Tag, TypeAdapter

from gpubox.servers.base import Service
from gpubox.spec import SERVICE_TYPES

DEFAULT_TYPE = "llama-server"
"""A service written without a ``type`` is a llama-server (the first type gpubox ran)."""

_TYPES: dict[str, type[Service]] = {}
_ADAPTER: list[TypeAdapter[Service]] = []
ServiceType = TypeVar("ServiceType", bound=type[Service])


def _tag_of(value: Any) -> str:
    """A service's type: its ``type`` field; a service written without one is a llama-server."""
    if isinstance(value, dict):
        return str(value.get("type", DEFAULT_TYPE))
    return str(getattr(value, "type", DEFAULT_TYPE))


def register_server_type(service_type: ServiceType) -> ServiceType:
    """Make ``service_type`` a server type every ``Box`` validated from now on accepts (by its ``type``).

    Registering the same class again is a no-op; another class under a registered tag is refused.
    """
    tag = service_type.type_tag()
    registered = _TYPES.get(tag)
    if registered is not None and registered is not service_type:
        raise ValueError(f"server type {tag!r} is {registered.__module__}.{registered.__qualname__} already")
    if registered is None:
        _TYPES[tag] = service_type
        SERVICE_TYPES.add(tag)
        _ADAPTER.clear()
    return service_type


def server_types() -> tuple[type[Service], ...]:
    """Every registered server type, in registration order."""
    return tuple(_TYPES.values())


def _adapter() -> TypeAdapter[Service]:
    if not _ADAPTER:
        members: tuple[Any, ...] = tuple(Annotated[service_type, Tag(tag)] for tag, service_type in _TYPES.items())
        union: Any = Annotated[Union[members], Discriminator(_tag_of)]  # noqa: UP007 (the members, a tuple)
        _ADAPTER.append(TypeAdapter(union))
    return _ADAPTER[0]


def validate_service(value: Any, _handler: Callable[[Any], Any]) -> Service:
    """A service, validated as the registered type its ``type`` names (a pydantic wrap validator)."""
    return _adapter().validate_python(value)
