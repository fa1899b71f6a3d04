"""Which package manager a host has: the one distro test every install operation makes."""

from __future__ import annotations

from typing import Literal

from pyinfra.facts.server import LinuxDistribution

from .host_facts import FactRead, read

PackageManager = Literal["apt", "pacman"]


def package_manager() -> PackageManager | None:
    """``apt`` on Debian and its kin, ``pacman`` on Arch, None elsewhere (the caller says what to do by hand)."""
    distro = read(DISTRO_READ)
    meta = distro["release_meta"]
    ids = {(distro["name"] or "").lower(), (meta.get("ID") or "").lower(), *(meta.get("ID_LIKE") or "").lower().split()}
    if ids & {"debian", "ubuntu"}:
        return "apt"
    if ids & {"arch", "arch linux", "archlinux"}:
        return "pacman"
    return None


def distro_name() -> str:
    return str(read(DISTRO_READ)["name"])


DISTRO_READ: FactRead = (LinuxDistribution, {})
"""What ``package_manager`` reads (an operation that prefetches its reads lists it)."""
