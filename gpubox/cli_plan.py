"""`gpubox plan INVENTORY`: each host's VRAM budget per GPU, from its models' GGUF headers.

A model's header is read from its ``source`` when that is a file on the controller, otherwise from
``--headers DIR/<basename of the model's path>`` (by default ``gguf-headers/`` next to the inventory
file; a relative ``source`` is taken from the inventory file's directory too) (a header-only GGUF, see
``scripts/make-gemma4-headers``). A ggml whisper model's header is read from its controller ``source``
when there is one (its declared size is refused when the header says another). GPUs are the box's
``expected_gpus``.

``--json`` prints one JSON document instead of the tables (see :func:`plan_json`), for scripts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from gpubox.box import Box
from gpubox.gguf_header import GgufFile
from gpubox.inventory import HostBox, InventoryError, inventory_boxes, inventory_dir, with_missing_sources
from gpubox.peers import has_peers
from gpubox.spec import Problem
from gpubox.tables import explain_terms, gpu_table, mib, print_refusal, problems_table
from gpubox.vram import (
    HEADERS_DIR_NAME,
    BoxPlan,
    LentDevice,
    VramInputs,
    default_headers_dir,
    headers_for_box,
    lent_devices,
    lent_shares,
    plan_box,
    whisper_headers_for_box,
)

EXIT_OK = 0
EXIT_REFUSED = 2

HEADERS_HELP = f"{HEADERS_DIR_NAME}/ in the inventory file's directory, as a relative model source is"


def headers_dir(args: argparse.Namespace) -> Path:
    """``--headers`` (relative to the working directory), else ``gguf-headers`` next to the inventory file."""
    given: str | None = args.headers
    return Path(given) if given is not None else default_headers_dir(inventory_dir(args.inventory))


def _problem_json(problem: Problem) -> dict[str, str | None]:
    return {"field": problem.field, "message": problem.message}


def _term_key(name: str) -> str:
    return name.lower().replace(" ", "_")  # "draft KV" -> "draft_kv"


def plan_json(host: str, plan: BoxPlan | None, problems: list[dict[str, str | None]]) -> dict[str, Any]:
    """One host's plan for ``--json``: per GPU, each service's terms, the total, capacity, fits (bytes)."""
    gpus = [
        {
            "index": gpu.index,
            "capacity_bytes": gpu.total_bytes,
            "used_bytes": gpu.used_bytes,
            "reserved_bytes": gpu.reserve_bytes,
            "free_bytes": gpu.free_bytes,
            "fits": gpu.fits,
            "services": [
                {
                    "service": share.service,
                    "terms_bytes": {_term_key(name): value for name, value in share.terms.items()},
                    "total_bytes": share.total,
                }
                for share in gpu.shares
            ],
        }
        for gpu in (plan.gpus if plan is not None else ())
    ]
    fits = plan is not None and plan.fits and not problems
    return {"host": host, "fits": fits, "gpus": gpus, "problems": problems}


def _remote_json(devices: list[LentDevice], host: str) -> dict[str, Any]:
    """``remote_devices``, on a host whose llama-servers use other hosts' devices only: the RPC server, where it
    runs (a GPU, or the CPU), the terms (bytes) the client puts there."""
    remote = [
        {
            "service": device.service,
            "rpc": f"{device.rpc}@{device.lender}",
            "device": "CPU" if device.gpu is None else f"GPU {device.gpu}",
            "terms_bytes": {_term_key(name): value for name, value in device.terms.items()},
            "total_bytes": device.total,
        }
        for device in devices
        if device.client == host
    ]
    return {"remote_devices": remote} if remote else {}


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    """Print each host's GPU budget; refuse (exit 2) when a box is refused, a GPU is over budget or a
    header is missing. With ``--json``, print one JSON document and nothing else on stdout."""
    as_json: bool = getattr(args, "json", False)
    try:
        boxes = inventory_boxes(args.inventory)
    except InventoryError as error:
        if as_json:
            refusals = [_problem_json(problem) for problem in error.problems]
            print(json.dumps({"hosts": [], "error": str(error), "problems": refusals}, indent=2))
            return EXIT_REFUSED
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        if error.problems:
            console.print(problems_table([HostBox(host="(inventory)", box=None, problems=error.problems)]))
        return EXIT_REFUSED
    base = inventory_dir(args.inventory)
    boxes = [with_missing_sources(host_box, base) for host_box in boxes]  # as the deploy looks for them
    code = EXIT_OK
    hosts: list[dict[str, Any]] = []
    refused_boxes = [host_box for host_box in boxes if host_box.box is None or host_box.problems]
    if refused_boxes:
        code = EXIT_REFUSED
        if not as_json:
            console.print(problems_table(refused_boxes))
        hosts += [
            plan_json(host_box.host, None, [_problem_json(problem) for problem in host_box.problems])
            for host_box in refused_boxes
        ]
    valid = {host_box.host: host_box.box for host_box in boxes if host_box.box is not None and not host_box.problems}
    # each header read once: for a host's own plan, and for what its llama-servers put on other hosts' devices
    headers_read = {name: headers_for_box(box, headers_dir(args), base) for name, box in valid.items()
                    if box.expected_gpus or has_peers(box)}  # fmt: skip
    devices = lent_devices(valid, {name: VramInputs(headers=read[0]) for name, read in headers_read.items()})
    lent = lent_shares(devices)
    for name, box in valid.items():
        for device in devices:
            if device.client == name and not as_json:
                where = "CPU" if device.gpu is None else f"GPU {device.gpu}"
                console.print(f"{name}: {device.service} puts {mib(device.total)} MiB on {device.rpc}@"
                              f"{device.lender} ({where})", highlight=False)  # fmt: skip
        if not box.expected_gpus:
            if not as_json:
                console.print(f"{name}: no expected_gpus: nothing to budget against", highlight=False)
            hosts.append(plan_json(name, None, []) | {"fits": True} | _remote_json(devices, name))
            continue
        headers, missing = headers_read[name]
        missing = list(missing)
        whisper_headers, unreadable = whisper_headers_for_box(box, base)
        missing += unreadable
        gpus = [(gpu.index, gpu.memory_total_mib) for gpu in box.expected_gpus]
        plan = plan_box(box, headers, gpus, whisper_headers=whisper_headers, lent=lent.get(name, []))
        if missing or not plan.fits:
            code = EXIT_REFUSED
        if as_json:
            problems: list[dict[str, str | None]] = [
                {"field": None, "message": text} for text in (*missing, *plan.problems)
            ]
            hosts.append(
                plan_json(name, plan, problems + [_problem_json(p) for p in plan.refused]) | _remote_json(devices, name)
            )
            continue
        print_plan(console, name, box, plan, headers, missing)
    if as_json:
        print(json.dumps({"hosts": hosts}, indent=2))
    return code


def print_plan(
    console: Console, host: str, box: Box, plan: BoxPlan, headers: dict[str, GgufFile], missing: list[str]
) -> None:
    """One host's tables: what kept it from planning, the fields its headers refuse, each GPU's budget."""
    for problem in (*missing, *plan.problems):
        console.print(f"[bold red]refused[/]: {host}: {problem}", highlight=False)
    if plan.refused:
        console.print(problems_table([HostBox(host=host, box=box, problems=list(plan.refused))]))
    for gpu in plan.gpus:
        console.print(gpu_table(host, gpu))
    for service_plan in plan.services:
        cells = service_plan.kv_cells
        console.print(
            f"{service_plan.service}: KV cells {cells.full} full-attention / {cells.swa} sliding-window; "
            f"on the CPU: {mib(service_plan.cpu_weights)} MiB weights, {mib(service_plan.cpu_kv_cache)} MiB KV",
            highlight=False,
        )
        for note in service_plan.notes:
            console.print(f"  note: {note}", highlight=False)
    explain_terms(console)
    print_refusal(console, host, box, plan, headers)  # only the GPUs over budget, only planned services


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    plan = commands.add_parser("plan", help="budget each GPU's memory from the models' GGUF headers")
    plan.add_argument("inventory", help="a pyinfra inventory file, e.g. inventory/home.py")
    plan.add_argument(
        "--headers",
        help=f"directory of header-only GGUFs named like the models' basenames (default: {HEADERS_HELP})",
    )
    plan.add_argument(
        "--json",
        action="store_true",
        help="print the plan as JSON (per host and GPU: each service's terms, total, capacity, fits; problems)",
    )
    plan.set_defaults(run=cmd_plan)
