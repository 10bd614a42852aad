"""What can run on this machine (notebook 00): ``what_fits(report)`` for the course models,
``notebooks_here(report)`` for the notebooks (``labhelpers/data/notebooks.json``); one row
each, with the reason (show them with ``pandas.DataFrame(rows)``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from labhelpers.files import GB, GIB
from labhelpers.machine import Report
from labhelpers.models import ModelSpec, registry

_NOTEBOOKS_FILE = Path(__file__).resolve().parent / "data" / "notebooks.json"


def _gpu_fit(need_gb: float, report: Report) -> tuple[bool, str]:
    if not report.gpus:
        return False, "no NVIDIA GPU found on this machine"
    gpu = max(report.gpus, key=lambda g: g.total_memory_gib)
    have = gpu.total_memory_gib * GIB / GB
    where = f"GPU {gpu.index} ({gpu.name}, {have:.1f} GB)"
    if need_gb > have:
        return False, f"needs ~{need_gb:.1f} GB, more than {where}"
    reason = f"~{need_gb:.1f} GB of {where}; {have - need_gb:.1f} GB left for the KV cache"
    if not gpu.torch_visible:
        reason += "; torch in this environment cannot use this GPU"
    return True, reason


def _cpu_fit(need_gb: float, report: Report, target: str) -> tuple[bool, str]:
    if report.ram_available_gib is None:
        return False, "available RAM unknown"
    have = report.ram_available_gib * GIB / GB
    if need_gb > have:
        return False, f"needs ~{need_gb:.1f} GB RAM, {have:.1f} GB available; close other programs"
    reason = f"~{need_gb:.1f} GB of {have:.1f} GB available RAM"
    return True, reason + ("; meant for a GPU: runs, but slowly, on CPU" if target == "gpu" else "")


def what_fits(report: Report, specs: Iterable[ModelSpec] | None = None) -> list[dict[str, Any]]:
    """For every registry model (or ``specs``): does it fit this machine's GPU memory and
    available RAM (weights x 1.2 + 0.5 GB; the KV cache comes on top), and its disk?"""
    rows = []
    for spec in registry().values() if specs is None else specs:
        need = spec.memory_needed_gb()
        fits_gpu, gpu_reason = _gpu_fit(need, report)
        fits_cpu, cpu_reason = _cpu_fit(need, report, spec.target)
        free = None if report.disk_free_gib is None else report.disk_free_gib * GIB / GB
        row = dict(model=spec.name, params_b=spec.params_b, weights=spec.weights)
        row |= dict(size_gb=spec.size_gb, memory_gb=round(need, 2), fits_gpu=fits_gpu)
        row |= dict(gpu_reason=gpu_reason, fits_cpu=fits_cpu, cpu_reason=cpu_reason)
        row["disk_ok"] = None if free is None else spec.size_gb <= free
        row["run_on"] = "gpu" if fits_gpu else ("cpu" if fits_cpu else None)
        rows.append(row)
    return rows


def _notebook_row(nb_id: str, nb: dict[str, Any], report: Report) -> dict[str, Any]:
    row = {"notebook": nb_id, "title": nb["title"], "kernel": nb["kernel"], "skipped": []}
    kernels = {k.lower() for k in report.jupyter_kernels or {}}
    if report.jupyter_kernels is not None and nb["kernel"].lower() not in kernels:
        fix = "run ./course setup (it creates the environment and registers its kernel)"
        why = f"Jupyter kernel '{nb['kernel']}' is not registered"
        return row | {"status": "cannot run", "reason": why, "fix": fix}
    ram = report.ram_limit_gib or report.ram_total_gib
    if ram is not None and ram * GIB / GB < nb["min_ram_gb"]:
        why = f"needs {nb['min_ram_gb']} GB RAM, this machine has {ram * GIB / GB:.1f} GB"
        return row | {"status": "cannot run", "reason": why, "fix": "use a bigger machine"}
    gpus = [] if report.cpu_forced else [g for g in report.gpus if g.torch_visible]
    if nb["gpu_parts"] and not gpus:
        why = f"no usable NVIDIA GPU; on CPU it {nb['on_cpu']}"
        status = "runs with GPU cells skipped"
        return row | {"status": status, "skipped": list(nb["gpu_parts"]), "reason": why, "fix": ""}
    reason = f"GPU: {gpus[0].name}" if nb["gpu_parts"] else "CPU notebook"
    biggest = max((g.total_memory_gib for g in gpus), default=0.0)
    if nb["gpu_parts"] and nb.get("min_gpu_gb") and biggest * GIB / GB < nb["min_gpu_gb"]:
        reason += f"; its GPU parts assume {nb['min_gpu_gb']} GB, this GPU has less"
    return row | {"status": "runs fully", "reason": reason, "fix": ""}


def notebooks_here(report: Report, notebooks_file: str | Path | None = None) -> list[dict]:
    """For each course notebook: 'runs fully', 'runs with GPU cells skipped' (listed in
    'skipped') or 'cannot run', with the reason and a fix."""
    table = json.loads(Path(notebooks_file or _NOTEBOOKS_FILE).read_text(encoding="utf-8"))
    return [_notebook_row(k, nb, report) for k, nb in table.items() if not k.startswith("_")]
