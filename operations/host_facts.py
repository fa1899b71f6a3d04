"""Facts read once per deploy run.

pyinfra loads a fact afresh at every `host.get_fact` (a round trip each), and runs each operation's
checks twice in a run that plans first (without -y). The GPUs, the CUDA toolkit and the installed
build's version are read by several operations of one run; a model's stat and stamp by its `place`
and `stamp` operations (and the surgical deploy's checks). Each is loaded once per host and run
here. An operation about to change what a fact read (`place` replacing a model) `forget`s it first,
so the operations after it read the host again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from pyinfra import host, state
from pyinfra.api.facts import FactBase

T = TypeVar("T")

_MEMO = "_gpubox_facts_once"  # kept on the run's State: a new run (or test) starts empty


def _loaded() -> dict[Hashable, Any]:
    loaded: dict[Hashable, Any] | None = getattr(state, _MEMO, None)
    if loaded is None:
        loaded = {}
        setattr(state, _MEMO, loaded)  # on the run's State itself (`state` is a context proxy)
    return loaded


def once(key: Hashable, load: Callable[[], T]) -> T:
    """`load()` at most once per host and run for `key` (e.g. a hash keyed by the file's stat)."""
    loaded = _loaded()
    host_key = (host.name, key)
    if host_key not in loaded:
        loaded[host_key] = load()
    value: T = loaded[host_key]
    return value


def _fact_key(fact: type[FactBase[Any]], arguments: dict[str, Any]) -> Hashable:
    return (fact, tuple(sorted(arguments.items())))


def fact_once(fact: type[FactBase[T]], **arguments: Any) -> T:
    """`host.get_fact(fact, **arguments)`, loaded at most once per host in this run."""
    return once(_fact_key(fact, arguments), lambda: host.get_fact(fact, **arguments))


def forget(fact: type[FactBase[Any]], **arguments: Any) -> None:
    """Drop what `fact_once` loaded for these arguments: the next read goes to the host."""
    _loaded().pop((host.name, _fact_key(fact, arguments)), None)
