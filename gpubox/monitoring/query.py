"""Read the fleet's Prometheus: a small HTTP API client, and the rows and plots ``gpubox top`` and
``gpubox report`` show.

One query per metric over the whole fleet, grouped by labels (never one per service), so a refresh
costs a handful of requests however many services there are. Speed is always the ratio of
llama-server's counters' rates, ``rate(tokens_predicted_total) / rate(tokens_predicted_seconds_total)``
(its ``predicted_tokens_seconds`` gauge resets on every read: see :mod:`.metrics`); acceptance is
``rate(accepted) / rate(draft)``. Both ratios cancel rate()'s extrapolation, so a steady server reads
its true figure.

A llama-server's remote devices (its RPC servers) are up when their TCP probe connects, or while the
llama-server itself is up: it holds the RPC server's one connection then, and a busy ggml-rpc-server's
accept queue (backlog 1) lets no probe in (:mod:`.rules`). Down: the probe fails and the llama-server
is not up.

A gateway's model groups (``gateway_rows``): how many of each group's backends HAProxy has UP (its
``haproxy_server_status`` state set) of those the inventory names, the sessions its backends serve and the
requests queued for a free slot; three requests more, only when the fleet has a gateway.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from rich.table import Table

from gpubox.gpu import gpu_list
from gpubox.monitoring import metrics
from gpubox.monitoring.fleet import KIND_GATEWAY, KIND_NODE, KIND_RPC_PROBE, Fleet, group_proxy, scrape_targets

GIB = 1024**3
DEFAULT_TIMEOUT_S = 10.0


class PrometheusError(Exception):
    """Prometheus could not be reached, or refused a request: the message names the URL and its error."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message


@dataclass(frozen=True)
class Sample:
    """One series of an instant vector: its labels and its value (NaN/Inf kept as Prometheus says)."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and its ``(unix time, value)`` points."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


@dataclass(frozen=True)
class Alert:
    """One alert of ``/api/v1/alerts``: its name, state (``pending``/``firing``) and labels."""

    name: str
    state: str
    labels: dict[str, str]


@dataclass
class PrometheusClient:
    """Prometheus's HTTP API at ``url`` (``http://host:9090``): instant and range queries, and alerts."""

    url: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        url = f"{self.url}{path}"
        try:
            response = self.session.get(url, params=params, timeout=self.timeout_s)
        except requests.RequestException as error:
            raise PrometheusError(url, f"Prometheus is unreachable ({type(error).__name__}: {error})") from error
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(
                url, f"HTTP {response.status_code}, not Prometheus's JSON: {response.text[:200]!r}"
            ) from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error_type = body.get("errorType", "error") if isinstance(body, dict) else "error"
            message = body.get("error", body) if isinstance(body, dict) else body
            query = f" (query {params['query']!r})" if "query" in params else ""
            raise PrometheusError(url, f"HTTP {response.status_code}, Prometheus says {error_type}: {message}{query}")
        return body.get("data")

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        """An instant query (``/api/v1/query``) at ``at`` (default: now)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "vector":
            return [Sample(labels=dict(item["metric"]), value=float(item["value"][1])) for item in result]
        if kind == "scalar":
            return [Sample(labels={}, value=float(result[1]))]
        raise PrometheusError(f"{self.url}/api/v1/query", f"{promql!r} gave a {kind}, not an instant vector")

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[Series]:
        """A range query (``/api/v1/query_range``) from ``start`` to ``end`` every ``step_s`` seconds."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        data = self._get("/api/v1/query_range", params)
        if data.get("resultType") != "matrix":
            raise PrometheusError(
                f"{self.url}/api/v1/query_range", f"{promql!r} gave a {data.get('resultType')}, not a matrix"
            )
        return [
            Series(labels=dict(item["metric"]), points=[(float(t), float(v)) for t, v in item["values"]])
            for item in data["result"]
        ]

    def alerts(self) -> list[Alert]:
        """Every active alert (``/api/v1/alerts``): pending and firing."""
        data = self._get("/api/v1/alerts", {})
        return [
            Alert(name=item["labels"].get("alertname", "?"), state=item.get("state", "?"), labels=dict(item["labels"]))
            for item in data.get("alerts", [])
        ]


# --- PromQL, one query per figure over the whole fleet -------------------------------------------


def _window(fleet: Fleet) -> str:
    return f"{fleet.monitoring.rate_window_s}s"


def _ratio(numerator: str, denominator: str, window: str, selector: str = "") -> str:
    by = "sum by (host, service)"
    return f"{by} (rate({numerator}{selector}[{window}])) / {by} (rate({denominator}{selector}[{window}]))"


def tokens_per_second_query(window: str) -> str:
    """Decode speed per (host, service): the counters' rates, never the gauge."""
    return _ratio(metrics.LLAMA_TOKENS_PREDICTED, metrics.LLAMA_TOKENS_PREDICTED_SECONDS, window)


def acceptance_query(window: str, drafting_only: bool = False) -> str:
    """Draft acceptance per (host, service): accepted / drafted tokens."""
    selector = '{spec_type!="none"}' if drafting_only else ""
    return _ratio(metrics.LLAMA_ACCEPTED_TOKENS, metrics.LLAMA_DRAFT_TOKENS, window, selector)


UP_QUERY = f'up{{kind!="{KIND_NODE}",kind!="{KIND_RPC_PROBE}"}}'
PROBE_QUERY = f'max by (host, service, rpc) ({metrics.PROBE_SUCCESS}{{kind="{KIND_RPC_PROBE}"}})'
UNIT_ACTIVE_QUERY = f"max by (host, service) ({metrics.UNIT_ACTIVE})"
VRAM_USED_QUERY = f"max by (host, gpu) ({metrics.GPU_MEMORY_USED})"
VRAM_PLANNED_QUERY = f"max by (host, gpu) ({metrics.GPU_PLANNED_MEMORY})"
_GATEWAY = f'kind="{KIND_GATEWAY}"'
GATEWAY_HEALTHY_QUERY = (
    f'count by (host, proxy) ({metrics.HAPROXY_SERVER_STATUS}{{{_GATEWAY},state="{metrics.HAPROXY_STATE_UP}"}} == 1)'
)
"""Per gateway host and group (``proxy``), its backends HAProxy has UP."""
GATEWAY_SESSIONS_QUERY = f"sum by (host, proxy) ({metrics.HAPROXY_SERVER_SESSIONS}{{{_GATEWAY}}})"
"""Per gateway host and group, the requests its backends serve now."""
GATEWAY_QUEUE_QUERY = (
    f"sum by (host, proxy) ({metrics.HAPROXY_BACKEND_QUEUE}{{{_GATEWAY}}}) + "
    f"sum by (host, proxy) ({metrics.HAPROXY_SERVER_QUEUE}{{{_GATEWAY}}})"
)
"""Per gateway host and group, the requests waiting for a slot: the group's queue and its servers'."""


# --- top's rows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's VRAM as its host reports it, and its plan's total (None: no series)."""

    gpu: int
    used_bytes: float | None
    planned_bytes: float | None

    @property
    def over_plan(self) -> bool:
        return self.used_bytes is not None and self.planned_bytes is not None and self.used_bytes > self.planned_bytes


@dataclass(frozen=True)
class RemoteDeviceState:
    """One RPC server a llama-server puts layers on, as its host's probe and the llama-server itself say.

    + rpc: ``service@host`` of the RPC server; endpoint: the ``address:port`` the llama-server dials
    + probe: the last TCP probe connected (None: no probe series)
    + in_use: the probe failed while the llama-server is up: it holds the RPC server's one connection
    """

    rpc: str
    endpoint: str
    probe: bool | None
    in_use: bool = False

    @property
    def up(self) -> bool | None:
        return True if self.probe or self.in_use else self.probe


@dataclass(frozen=True)
class FleetRow:
    """One service of the fleet as Prometheus sees it now; None: no data (no series, idle, or down).

    A service that is down has no speed or acceptance, though the rate window still holds its last
    counters' samples for up to ``rate_window_s`` after it went down: that tail is not its speed now.
    """

    host: str
    service: str
    type: str
    gpus: tuple[int, ...]
    up: bool | None
    drafting: bool
    tokens_per_second: float | None
    acceptance: float | None
    vram: tuple[GpuMemory, ...]
    alerts: tuple[str, ...]
    decodes: bool = False
    """Whether it reports a decode speed (a chat server Prometheus scrapes): idle when it has none."""
    remote: tuple[RemoteDeviceState, ...] = ()
    """The RPC servers on other hosts it puts layers on, in its ``rpc`` order."""


@dataclass(frozen=True)
class GatewayRow:
    """One model group of a gateway as Prometheus sees it now; None: no data (HAProxy not scraped).

    + healthy: its backends HAProxy has UP; total: those the inventory names; min_healthy: the group's
    + sessions: requests its backends serve; queued: requests waiting for a free slot
    """

    host: str
    group: str
    healthy: int | None
    total: int
    min_healthy: int
    sessions: float | None
    queued: float | None
    alerts: tuple[str, ...] = ()

    @property
    def degraded(self) -> bool:
        return self.healthy is None or self.healthy < self.min_healthy


def gateway_rows(fleet: Fleet, client: PrometheusClient, alerts: Sequence[Alert] | None = None) -> list[GatewayRow]:
    """One row per model group of each gateway, in inventory order; three requests (none without a gateway), and
    the alerts unless ``alerts`` are given. A group HAProxy reports no UP backend of, while it reports the
    group's sessions, has 0 healthy."""
    gateways = [host for host in fleet.hosts if host.gateway is not None]
    if not gateways:
        return []
    healthy = _by(client.query(GATEWAY_HEALTHY_QUERY), "host", "proxy")
    sessions = _by(client.query(GATEWAY_SESSIONS_QUERY), "host", "proxy")
    queued = _by(client.query(GATEWAY_QUEUE_QUERY), "host", "proxy")
    firing = [alert for alert in (client.alerts() if alerts is None else alerts) if alert.state == "firing"]
    rows = []
    for host in gateways:
        assert host.gateway is not None
        for group in host.gateway.groups:
            key = (host.name, group_proxy(group.name))
            reported = key in sessions
            count = healthy.get(key)
            rows.append(GatewayRow(
                host=host.name,
                group=group.name,
                healthy=int(count) if count is not None else (0 if reported else None),
                total=len(group.backends),
                min_healthy=group.min_healthy,
                sessions=sessions.get(key),
                queued=queued.get(key),
                alerts=tuple(sorted({
                    alert.name for alert in firing
                    if alert.labels.get("host") == host.name
                    and alert.labels.get("group", group.name) == group.name
                    and alert.name.startswith("GpuboxGateway")
                })),
            ))  # fmt: skip
    return rows


def gateway_table(rows: Sequence[GatewayRow], title: str = "gpubox gateways") -> Table:
    """A row per model group: its healthy backends of all (red below ``min_healthy``), sessions, queue, alerts."""
    table = Table(title=title)
    for column in ("host", "group"):
        table.add_column(column)
    for column in ("healthy/total", "min", "sessions", "queued"):
        table.add_column(column, justify="right")
    table.add_column("alerts", overflow="fold")
    for row in rows:
        healthy = f"{'?' if row.healthy is None else row.healthy}/{row.total}"
        table.add_row(
            row.host,
            row.group,
            f"[bold red]{healthy}[/]" if row.degraded else f"[green]{healthy}[/]",
            str(row.min_healthy),
            "-" if row.sessions is None else f"{row.sessions:.0f}",
            "-" if row.queued is None else f"{row.queued:.0f}",
            f"[bold red]{', '.join(row.alerts)}[/]" if row.alerts else "",
        )
    return table


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _by(samples: list[Sample], *names: str) -> dict[tuple[str, ...], float]:
    return {tuple(sample.labels.get(name, "") for name in names): sample.value for sample in samples}


def _alert_applies(alert: Alert, host: str, service: str, gpus: tuple[int, ...]) -> bool:
    """An alert names a service (its row), else a GPU (the rows of the services on it), else a host (all its rows)."""
    labels = alert.labels
    if labels.get("host") != host:
        return False
    if "service" in labels:
        return labels["service"] == service
    if "gpu" in labels:
        named = {part.strip() for part in labels["gpu"].split(",")}
        return any(str(gpu) in named for gpu in gpus)
    return True


def fleet_rows(fleet: Fleet, client: PrometheusClient) -> list[FleetRow]:
    """One row per (host, service) of the fleet, every service type, in inventory order; seven requests (eight
    when a llama-server uses RPC servers)."""
    window = _window(fleet)
    up = _by(client.query(UP_QUERY), "job")
    uses_rpc = any(host.remote for host in fleet.hosts)
    probes = _by(client.query(PROBE_QUERY), "host", "service", "rpc") if uses_rpc else {}
    active = _by(client.query(UNIT_ACTIVE_QUERY), "host", "service")
    speed = _by(client.query(tokens_per_second_query(window)), "host", "service")
    acceptance = _by(client.query(acceptance_query(window)), "host", "service")
    used = _by(client.query(VRAM_USED_QUERY), "host", "gpu")
    planned = _by(client.query(VRAM_PLANNED_QUERY), "host", "gpu")
    firing = [alert for alert in client.alerts() if alert.state == "firing"]

    rows: list[FleetRow] = []
    for host in fleet.hosts:
        jobs = {target.labels.get("service"): target.job for target in scrape_targets(host)}
        for service in host.services:
            key = (host.name, service.name)
            gpus = service.placement
            scraped = service.scrape() is not None
            decodes = scraped and service.CHAT
            # a scraped service is up when Prometheus scrapes it; another when systemd runs it
            job = jobs.get(service.name, f"{service.name}@{host.name}")
            value = up.get((job,)) if scraped else active.get(key)
            is_up = None if value is None else value >= 1
            drafting = service.drafts
            serving = is_up is not False  # down: the rate window's tail is no speed
            remote = []
            for device in host.remote_of(service.name):
                probe = probes.get((host.name, service.name, device.name))
                connected = probe is not None and probe < 1 and is_up is True
                remote.append(RemoteDeviceState(
                    rpc=device.name, endpoint=device.endpoint, probe=None if probe is None else probe >= 1,
                    in_use=connected,
                ))  # fmt: skip
            rows.append(
                FleetRow(
                    host=host.name,
                    service=service.name,
                    type=service.type_tag(),
                    gpus=gpus,
                    up=is_up,
                    drafting=drafting,
                    tokens_per_second=_finite(speed.get(key)) if decodes and serving else None,
                    acceptance=_finite(acceptance.get(key)) if drafting and serving else None,
                    vram=tuple(
                        GpuMemory(
                            gpu=gpu,
                            used_bytes=used.get((host.name, str(gpu))),
                            planned_bytes=planned.get((host.name, str(gpu))),
                        )
                        for gpu in gpus
                    ),
                    alerts=tuple(
                        sorted({alert.name for alert in firing if _alert_applies(alert, host.name, service.name, gpus)})
                    ),
                    decodes=decodes,
                    remote=tuple(remote),
                )
            )
    return rows


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f}"


def _vram_cell(row: FleetRow) -> str:
    lines = []
    for memory in row.vram:
        text = f"{memory.gpu}: {_gib(memory.used_bytes)}/{_gib(memory.planned_bytes)} GiB"
        lines.append(f"[bold red]{text}[/]" if memory.over_plan else text)
    return "\n".join(lines) or "-"


def _up_cell(up: bool | None) -> str:
    if up is None:
        return "[dim]?[/]"
    return "[green]up[/]" if up else "[bold red]DOWN[/]"


def _remote_cell(row: FleetRow) -> str:
    lines = []
    for device in row.remote:
        state = _up_cell(device.up)
        if device.in_use:
            state = "[green]up[/] [dim](in use)[/]"
        lines.append(f"{device.rpc} {state}")
    return "\n".join(lines) or "-"


def top_table(rows: Sequence[FleetRow], title: str = "gpubox fleet") -> Table:
    """The fleet at a glance: a row per service, its GPUs' VRAM (used/planned), its remote devices (when a
    service of the fleet uses RPC servers) and its firing alerts."""
    table = Table(title=title)
    table.add_column("host")
    table.add_column("GPUs")
    table.add_column("service")
    table.add_column("type")
    table.add_column("up")
    table.add_column("tok/s", justify="right")
    table.add_column("accept", justify="right")
    table.add_column("VRAM used/planned", justify="right")
    remote = any(row.remote for row in rows)
    if remote:
        table.add_column("remote devices")
    table.add_column("alerts", overflow="fold")
    for row in rows:
        speed = "-" if row.tokens_per_second is None else f"{row.tokens_per_second:.1f}"
        if row.decodes and row.tokens_per_second is None and row.up:
            speed = "[dim]idle[/]"
        acceptance = "-" if row.acceptance is None else f"{row.acceptance:.0%}"
        cells = [
            row.host,
            gpu_list(row.gpus),
            row.service,
            row.type,
            _up_cell(row.up),
            speed,
            acceptance,
            _vram_cell(row),
            *([_remote_cell(row)] if remote else []),
            f"[bold red]{', '.join(row.alerts)}[/]" if row.alerts else "",
        ]
        table.add_row(*cells)
    return table


# --- report's figure ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSeries:
    """What ``report_png`` drew: each subplot's legend entries."""

    tokens_per_second: list[str]
    acceptance: list[str]
    vram_used: list[str]
    vram_planned: list[str]

    @property
    def counts(self) -> dict[str, int]:
        return {
            "tokens_per_second": len(self.tokens_per_second),
            "acceptance": len(self.acceptance),
            "vram_used": len(self.vram_used),
            "vram_planned": len(self.vram_planned),
        }


def report_step_s(since_s: float) -> float:
    """About 240 points per series, never finer than 15 s (the default scrape interval)."""
    return max(15.0, math.ceil(since_s / 240))


def _service_label(labels: Mapping[str, str]) -> str:
    return f"{labels.get('service', '?')}@{labels.get('host', '?')}"


def _times(series: Series) -> list[datetime]:
    return [datetime.fromtimestamp(t) for t, _ in series.points]


def _values(series: Series, scale: float = 1.0) -> list[float]:
    return [v / scale if math.isfinite(v) else math.nan for _, v in series.points]


def report_png(fleet: Fleet, client: PrometheusClient, since_s: float, path: str | Path) -> ReportSeries:
    """The last ``since_s`` seconds as one PNG: tok/s per service, acceptance per drafting service,
    and VRAM used (solid) vs planned (dashed) per host GPU; returns the legend entries it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    window = _window(fleet)
    end = time.time()
    start = end - since_s
    step = report_step_s(since_s)
    hosts = {host.name for host in fleet.hosts}

    def fetch(promql: str) -> list[Series]:
        found = [
            series for series in client.query_range(promql, start, end, step) if series.labels.get("host") in hosts
        ]
        return sorted(found, key=lambda one: tuple(one.labels.get(name, "") for name in ("host", "service", "gpu")))

    speed = fetch(tokens_per_second_query(window))
    acceptance = fetch(acceptance_query(window, drafting_only=True))
    used = fetch(VRAM_USED_QUERY)
    planned = fetch(VRAM_PLANNED_QUERY)

    figure, (speed_axes, acceptance_axes, vram_axes) = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    drawn = ReportSeries(tokens_per_second=[], acceptance=[], vram_used=[], vram_planned=[])
    for series in speed:
        label = _service_label(series.labels)
        speed_axes.plot(_times(series), _values(series), label=label)
        drawn.tokens_per_second.append(label)
    for series in acceptance:
        label = _service_label(series.labels)
        acceptance_axes.plot(_times(series), _values(series), label=label)
        drawn.acceptance.append(label)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def gpu_key(series: Series) -> tuple[str, str]:
        return series.labels.get("host", "?"), series.labels.get("gpu", "?")

    used_of = {gpu_key(series): series for series in used}
    planned_of = {gpu_key(series): series for series in planned}
    for index, key in enumerate(sorted({*used_of, *planned_of})):
        color = colors[index % len(colors)]
        for found, kind, style, names in (
            (used_of, "used", "-", drawn.vram_used),
            (planned_of, "planned", "--", drawn.vram_planned),
        ):
            if key in found:
                label = f"{key[0]} GPU {key[1]} {kind}"
                vram_axes.plot(_times(found[key]), _values(found[key], GIB), style, color=color, label=label)
                names.append(label)

    since = f"last {since_s / 3600:g} h" if since_s >= 3600 else f"last {since_s / 60:g} min"
    titled = (
        (speed_axes, f"decode speed per service (tok/s, rate over {window}), {since}", "tok/s"),
        (acceptance_axes, f"draft acceptance per drafting service (accepted / drafted, rate over {window})", "ratio"),
        (vram_axes, "VRAM per host GPU: used (solid) vs planned (dashed)", "GiB"),
    )
    for axes, title, unit in titled:
        axes.set_title(title)
        axes.set_ylabel(unit)
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(loc="upper left", fontsize=8)
        else:
            axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="grey")
    acceptance_axes.set_ylim(0, 1.05)
    vram_axes.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    vram_axes.xaxis.set_major_locator(locator)
    vram_axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn
