"""Read what a whole-box deploy will look at on the host in one round trip.

A converged host's deploy is a series of checks, each a fact, each a round trip over SSH: with
three services that was 32 of them. Each operation module says what it reads (`facts_read`), with
the arguments it will read them with: built by the very functions its operations read with
(`host_facts.read`), one per read, so the list and the reads cannot drift
(tests/operations/test_declared_reads.py); `prefetch_box` loads them all in one command
(`facts.batch.Facts`), and the operations' `fact_once` answers from it. The services' unverified
marks (`facts.unverified.UnverifiedServices`: a run cut between a restart and its smoke test) are
among them: finding one costs a converged host no round trip.
"""

from __future__ import annotations

from gpubox.box import Box
from gpubox.piper_install import PiperFlavor

from . import models, piper, service, source_build, vram
from .host_facts import FactRead, prefetch


def piper_flavor(box: Box) -> PiperFlavor:
    """`cuda` when a service that runs from the piper install is placed on a GPU (onnxruntime-gpu), else `cpu`."""
    users = box.install_users(box.piper) if box.piper is not None else []
    return "cuda" if any(server.placement for server in users) else "cpu"


def box_reads(box: Box) -> list[FactRead]:
    """Every fact the full deploy reads on a converged host, with its arguments."""
    reads: list[FactRead] = [read for build in box.builds() for read in source_build.facts_read(build)]
    if box.piper is not None:
        reads += piper.facts_read(box.piper, piper_flavor(box))
    reads += [read for _, model in box.models() for read in models.facts_read(model)]
    reads += vram.facts_read(box)
    reads += [read for server in box.services for read in service.facts_read(server, box.prefix_of(server))]
    return [*reads, models.stamps_read()]


def prefetch_box(box: Box) -> None:
    """Load what the full deploy reads, in one round trip."""
    prefetch(box_reads(box))
