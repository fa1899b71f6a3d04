"""The typed monitoring specs: the fleet's ``Monitoring`` (and each host's ``HostMonitoring``, a ``Box``
field that lives in the core, gpubox/spec.py, beside the other host specs).

``Monitoring`` sits in every host's data under ``monitoring`` (the same object: group data does
that) and names the host that runs Prometheus. ``HostMonitoring`` is a ``Box`` field: the ports a
host's own exporter and agent listen on, checked against its services' ports like theirs are.
"""

from __future__ import annotations

import re
from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gpubox.spec import Spec, refuse

# Prometheus's own duration syntax for --storage.tsdb.retention.time (a number and one unit).
RETENTION = re.compile(r"^[1-9][0-9]*(ms|s|m|h|d|w|y)$")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
Port = int


class Monitoring(Spec):
    """The fleet's monitoring: which host runs Prometheus (and Alertmanager), and how it alerts (the
    hosts' ``monitoring`` in the inventory's data)."""

    monitor: str = Field(
        description="The inventory host that runs Prometheus; every other host's agent writes to it. A name that "
        "is no gpubox host of the inventory is refused."
    )
    address: str | None = Field(
        default=None,
        description="How the other hosts (and `gpubox top`) reach the monitor; None: the address Prometheus "
        "listens on, when `listen` names one, else the monitor's inventory address (`ssh_hostname`, else its name).",
    )
    listen: str = Field(
        default="127.0.0.1",
        description="The IP address Prometheus binds (`0.0.0.0` for every interface): loopback unless agents on "
        "other machines must reach it, and refused on loopback when they must.",
    )
    port: Port = Field(
        default=9090,
        ge=1,
        le=65535,
        description="Prometheus's port on the monitor; a port the monitor's box uses is refused.",
    )
    retention: str = Field(
        default="15d", description="How long Prometheus keeps samples: a Prometheus duration (`15d`, `12h`, `2w`)."
    )
    scrape_interval_s: int = Field(
        default=15, ge=1, le=3600, description="Prometheus's global scrape interval, in seconds."
    )
    evaluation_interval_s: int = Field(
        default=15, ge=1, le=3600, description="Prometheus's global rule evaluation interval, in seconds."
    )
    webhook_url: str | None = Field(
        default=None,
        description="Where Alertmanager posts alerts (http or https); None: no Alertmanager (alerts still show in "
        "Prometheus and `gpubox top`).",
    )
    alertmanager_port: Port = Field(
        default=9093,
        ge=1,
        le=65535,
        description="Alertmanager's port on the monitor (127.0.0.1); Prometheus's port or one the monitor's box "
        "uses is refused.",
    )
    group_wait_s: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="How long Alertmanager waits to batch a new alert group's first notification.",
    )
    down_for_s: int = Field(
        default=60, ge=0, le=86400, description="How long a service is down before its alert fires (seconds)."
    )
    slow_for_s: int = Field(
        default=600,
        ge=0,
        le=86400,
        description="How long decode speed or draft acceptance stays below its smoke threshold before the alert "
        "fires (seconds).",
    )
    rate_window_s: int = Field(
        default=300,
        ge=10,
        le=86400,
        description="The window (seconds) of the `rate()`s behind decode speed and draft acceptance.",
    )
    restarts_max: int = Field(
        default=3, ge=0, le=1000, description="A unit restarted more than this many times in 15 minutes alerts."
    )
    vram_margin_mib: int = Field(
        default=1024, ge=0, description="A GPU using more than its planned total plus this many MiB alerts."
    )
    grafana_provisioning: str = Field(
        default="/etc/grafana/provisioning",
        description="Grafana's provisioning directory on the monitor; the dashboards are placed there when it "
        "exists.",
    )

    @field_validator("monitor", "address")
    @classmethod
    def _host_name(cls, value: str | None) -> str | None:
        if value is not None and not HOST_NAME.match(value):
            raise ValueError(f"{value!r} is not a host name or address: use letters, digits, '.', '-', '_', ':'")
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_address(value)
        except ValueError as error:
            raise ValueError(
                f"listen must be an IP address (127.0.0.1, 0.0.0.0, a LAN address), got {value!r}"
            ) from error
        return value

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        if not RETENTION.match(value):
            raise ValueError(f"retention is a Prometheus duration such as 15d, 12h or 2w, got {value!r}")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c in value for c in "\n\r\x00 "):
            raise ValueError(f"webhook_url must be an http:// or https:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _own_ports(self) -> Self:
        if self.webhook_url is not None and self.alertmanager_port == self.port:
            refuse(
                type(self).__name__,
                [(("alertmanager_port",), f"port {self.port} is Prometheus's port already: give each its own",
                  self.alertmanager_port)],
            )
        return self
