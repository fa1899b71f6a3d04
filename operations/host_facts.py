"""Facts read once per deploy run.

pyinfra loads a fact afresh at every `host.get_fact` (a round trip each), and runs each operation's
checks twice in a run that plans first (without -y). The GPUs, the CUDA toolkit and the installed
build's version are read by several operations of one run; a model's stat and stamp by its `place`
and `stamp` operations (and the surgical deploy's checks). Each is loaded once per host and run
here, until an operation changes the host (`changes_so_far`): after that, facts are read afresh.
An operation about to change what a fact read (`place` replacing a model) `forget`s it first, so
the operations after it read the host again. `prefetch` loads many facts in one round trip: the
full deploy reads every check's fact that way (`operations.box_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

from pyinfra import host, state
from pyinfra.api.facts import FactBase

from facts import batch

from .pyinfra_internals import host_operations

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


def changes_so_far() -> int:
    """How many of this host's operations have changed it in this run so far.

    A fact read before a change may be out of date after it (the build a flag check reads did not
    exist yet): `fact_once` keeps a value only for as long as this number stays the same. With -y,
    pyinfra runs each operation's checks as it executes it, so on a host that changes, the facts
    after the first change are read again, one by one, as pyinfra would.
    """
    return sum(1 for meta in host_operations(state, host) if meta.is_complete() and meta.did_change())


def _fact_key(fact: type[FactBase[Any]], arguments: dict[str, Any]) -> Hashable:
    return (changes_so_far(), fact, tuple(sorted(arguments.items())))


def fact_once(fact: type[FactBase[T]], **arguments: Any) -> T:
    """`host.get_fact(fact, **arguments)`, loaded at most once per host in this run while nothing
    changed on the host (`changes_so_far`)."""
    return once(_fact_key(fact, arguments), lambda: host.get_fact(fact, **arguments))


def fact_name(fact: type[FactBase[Any]]) -> str:
    """The name `pyinfra @host fact` takes: `files.File`, `facts.gpu.NvidiaGpus`."""
    return f"{fact.__module__.removeprefix('pyinfra.facts.')}.{fact.__name__}"


FactRead = tuple[type[FactBase[Any]], dict[str, Any]]
"""A fact and the arguments an operation reads it with (`read`); each built by one function that the
operation and its module's declared reads (`facts_read`, prefetched) both call."""


def read(fact_read: FactRead) -> Any:
    """`fact_once` of a declared read: the operation reads with the very `FactRead` its module's
    prefetch list (`facts_read`) holds, built by one function per read, so the two cannot drift."""
    fact, arguments = fact_read
    return fact_once(fact, **arguments)


class MergedFact(Protocol):
    """A fact whose reads with different arguments `prefetch` loads as one (``facts.systemd.UnitStates``:
    every unit in one ``systemctl show``), each read then given its own part of the value."""

    @staticmethod
    def merged(reads: Sequence[Mapping[str, Any]]) -> dict[str, Any]: ...

    @staticmethod
    def share(value: Any, read: Mapping[str, Any]) -> Any: ...


def _merged_reads(reads: Sequence[FactRead]) -> tuple[list[FactRead], dict[int, list[FactRead]]]:
    """``reads`` with each `MergedFact`'s reads made one; which reads each merged one stands for, by its index."""
    loads: list[FactRead] = []
    stands_for: dict[int, list[FactRead]] = {}
    grouped: dict[type[FactBase[Any]], list[FactRead]] = {}
    for fact, arguments in reads:
        if hasattr(fact, "merged"):
            grouped.setdefault(fact, []).append((fact, arguments))
        else:
            loads.append((fact, arguments))
    for fact, group in grouped.items():
        merging = cast(MergedFact, fact)
        stands_for[len(loads)] = group
        loads.append((fact, merging.merged([arguments for _, arguments in group])))
    return loads, stands_for


def prefetch(reads: Sequence[FactRead]) -> None:
    """Load every fact of `reads` not loaded yet in one round trip; `fact_once` then answers from it.

    The arguments must be the very ones the operations pass to `fact_once` (a fact read with others
    is loaded on its own, as before: slower, never wrong). A `MergedFact`'s reads are loaded as one.
    """
    loaded = _loaded()
    todo = list({_fact_key(fact, arguments): (fact, arguments) for fact, arguments in reads}.values())
    todo = [(fact, arguments) for fact, arguments in todo if (host.name, _fact_key(fact, arguments)) not in loaded]
    if not todo:
        return
    loads, stands_for = _merged_reads(todo)
    requests = tuple((fact_name(fact), tuple(sorted(arguments.items()))) for fact, arguments in loads)
    found = batch.values(requests, host.get_fact(batch.Facts, requests=requests))
    for index, ((fact, arguments), value) in enumerate(zip(loads, found, strict=True)):
        if index not in stands_for:
            loaded[(host.name, _fact_key(fact, arguments))] = value
            continue
        for _, read_arguments in stands_for[index]:  # each merged read gets its own part
            loaded[(host.name, _fact_key(fact, read_arguments))] = cast(MergedFact, fact).share(value, read_arguments)


def forget(fact_read: FactRead) -> None:
    """Drop what `read` (`fact_once`) loaded for this read: the next read goes to the host."""
    fact, arguments = fact_read
    _loaded().pop((host.name, _fact_key(fact, arguments)), None)
