"""What can run on this machine: which course models fit, which notebooks run fully.

Used by notebook 00_env_check: ``what_fits(report)`` and ``notebooks_here(report)`` take an
``env.collect_report()`` and return one row per model / notebook, with the reason (show
them with ``pandas.DataFrame(rows)``). Models come from ``labhelpers.models.registry()``,
notebooks from ``labhelpers/data/notebooks.json``.

Importing this module is instant: standard library and ``packaging`` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from labhelpers import models
from labhelpers.env import EnvReport, GpuInfo, cpu_forced

NOTEBOOKS_FILE = Path(__file__).resolve().parent / "data" / "notebooks.json"


# --------------------------------------------------------------------------- models


def _gpu_fit(need: float, report: EnvReport) -> tuple[bool, str]:
    if not report.gpus:
        return False, "no NVIDIA GPU found on this machine"
    gpu = max(report.gpus, key=lambda g: g.total_memory_gb)
    have = gpu.total_memory_gb
    where = f"GPU {gpu.index} ({gpu.name}, {have:.1f} GB)"
    if need > have:
        return False, f"needs ~{need:.1f} GB, more than {where}"
    reason = f"~{need:.1f} GB of {where}; {have - need:.1f} GB left for the KV cache"
    if not gpu.torch_visible:
        reason += "; torch in this environment cannot use this GPU (CPU build)"
    return True, reason


def _cpu_fit(need: float, report: EnvReport, target: str) -> tuple[bool, str]:
    have = report.ram_available_gb
    if have is None:
        return False, "available RAM unknown"
    if need > have:
        total = report.ram_limit_gb or report.ram_total_gb
        hint = "; close other programs" if total is not None and need <= total else ""
        return False, f"needs ~{need:.1f} GB RAM, {have:.1f} GB available{hint}"
    reason = f"~{need:.1f} GB of {have:.1f} GB available RAM"
    if target == "gpu":
        reason += "; meant for a GPU: runs, but slowly, on CPU"
    return True, reason


def what_fits(
    report: EnvReport, specs: Iterable[models.ModelSpec] | None = None
) -> list[dict[str, Any]]:
    """For every model in the course registry (``labhelpers.models.registry()``, or the
    given ``specs``): whether it fits on this machine's GPU (vs GPU memory) and CPU
    (vs available RAM), and why. Used by notebook 00_env_check.

    The memory estimate is rough (``ModelSpec.memory_needed_gb``); the KV cache comes on
    top. Disk need is the download size, compared with free disk at ``report.disk_path``.
    """
    rows = []
    for spec in models.registry().values() if specs is None else specs:
        size = float(spec.size_gb)
        need = spec.memory_needed_gb()
        fits_gpu, gpu_reason = _gpu_fit(need, report)
        fits_cpu, cpu_reason = _cpu_fit(need, report, spec.target)
        free = report.disk_free_gb
        rows.append(
            {
                "model": spec.name,
                "params_b": spec.params_b,
                "weights": spec.weights,
                "target": spec.target,
                "size_gb": size,
                "memory_gb": round(need, 2),
                "fits_gpu": fits_gpu,
                "gpu_reason": gpu_reason,
                "fits_cpu": fits_cpu,
                "cpu_reason": cpu_reason,
                "disk_ok": None if free is None else size <= free,
                "run_on": "gpu" if fits_gpu else ("cpu" if fits_cpu else None),
            }
        )
    return rows


# --------------------------------------------------------------------------- notebooks


def _usable_gpus(report: EnvReport) -> list[GpuInfo]:
    """GPUs the notebook cells can use: visible to torch, and not forced off."""
    return [] if cpu_forced() else [g for g in report.gpus if g.torch_visible]


def _notebook_row(nb_id: str, nb: Mapping[str, Any], report: EnvReport) -> dict[str, Any]:
    row = {"notebook": nb_id, "title": nb["title"], "kernel": nb["kernel"], "skipped": []}
    kernels = report.jupyter_kernels
    if kernels is not None and nb["kernel"].lower() not in {k.lower() for k in kernels}:
        fix = f"register the kernel: python -m ipykernel install --user --name {nb['kernel']}"
        if nb["kernel"] != "qwen-lab-core":
            fix = f"create the notebook's own environment, then {fix} (from inside it)"
        why = f"Jupyter kernel '{nb['kernel']}' is not registered; the notebook is skipped"
        return row | {"status": "cannot run", "reason": why, "fix": fix}
    ram = report.ram_limit_gb or report.ram_total_gb
    if ram is not None and ram < nb["min_ram_gb"]:
        why = f"needs {nb['min_ram_gb']} GB RAM, this machine has {ram:.1f} GB"
        return row | {"status": "cannot run", "reason": why, "fix": "use a bigger machine"}
    gpus = _usable_gpus(report)
    if nb["gpu_parts"] and not gpus:
        why = f"no usable NVIDIA GPU; on CPU it {nb['on_cpu']}"
        return row | {
            "status": "runs with GPU cells skipped",
            "skipped": list(nb["gpu_parts"]),
            "reason": why,
            "fix": "",
        }
    reason = "CPU notebook" if not nb["gpu_parts"] else f"GPU: {gpus[0].name}"
    biggest = max((g.total_memory_gb for g in gpus), default=0.0)
    if nb["gpu_parts"] and nb.get("min_gpu_gb") and biggest < nb["min_gpu_gb"]:
        reason += f"; GPU parts assume {nb['min_gpu_gb']} GB, this GPU has {biggest:.1f} GB"
    return row | {"status": "runs fully", "reason": reason, "fix": ""}


def _load_notebook_table(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {nb_id: entry for nb_id, entry in data.items() if not nb_id.startswith("_")}


def notebooks_here(
    report: EnvReport, notebooks_file: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """For each course notebook (labhelpers/data/notebooks.json): 'runs fully',
    'runs with GPU cells skipped' (listed in 'skipped') or 'cannot run', with the reason
    and a fix. Used by notebook 00_env_check (show with ``pandas.DataFrame(rows)``)."""
    table = _load_notebook_table(Path(notebooks_file or NOTEBOOKS_FILE))
    return [_notebook_row(nb_id, nb, report) for nb_id, nb in table.items()]
