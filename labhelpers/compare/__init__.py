"""Which backend should I use? Every way of running the same model on this machine, measured
in one run next to its memory-bandwidth limit (notebook 06 and ``python -m labhelpers.compare``).

Per backend (:data:`backends.BACKENDS`): load time, TTFT, decode tokens/s and its share of the
roofline, aggregate tokens/s under concurrency, peak memory, size on disk, perplexity on the
held-out text of notebook 02, the answers to fixed prompts. A backend that cannot run gets a
row that says why; the recommendation is computed from the table (:func:`recommend.recommend`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labhelpers import machine as mach
from labhelpers import models
from labhelpers.compare.advice import number, plot_comparison, recommend, reference
from labhelpers.compare.backends import BACKENDS, Backend, Settings, get_backends, skip_reason
from labhelpers.compare.runs import measure
from labhelpers.envs import jsonable
from labhelpers.files import cache_dir, repo_root
from labhelpers.measure import heldout_text
from labhelpers.roofline import (
    bytes_per_token,
    memory_bandwidth_gbps,
    percent_of_roofline,
    roofline_tokens_per_s,
)

Log = Callable[[str], Any]
#: The table's columns, in order (results.csv).
COLUMNS = (
    "backend",
    "engine",
    "weights",
    "model",
    "status",
    "threads",
    "load_s",
    "ttft_s",
    "decode_tok_s",
    "roofline_tok_s",
    "pct_of_roofline",
    "aggregate_tok_s",
    "at_concurrency",
    "peak_mem_gb",
    "memory_kind",
    "disk_gb",
    "perplexity",
    "ppl_increase_pct",
    "perplexity_source",
    "new_tokens",
    "prompt_tokens",
    "engine_version",
    "note",
    "skipped_reason",
)


@dataclass
class Comparison:
    """:func:`run`'s result: one row per backend (with its sweep and answers), the machine,
    the settings. :meth:`table` is the comparison; :meth:`write` saves it."""

    rows: list[dict[str, Any]]
    machine: dict[str, Any]
    settings: Settings
    command: str = ""
    max_ppl_increase: float = 0.5

    def table(self) -> Any:
        import pandas as pd

        table = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in self.rows])
        return table.astype({"at_concurrency": "Int64"})

    def sweep_frame(self) -> Any:
        """Aggregate tokens/s per backend and concurrency level."""
        import pandas as pd

        levels = [
            {"backend": r["backend"], "mode": r.get("sweep_mode"), **lv}
            for r in self.rows
            for lv in r.get("sweep") or []
        ]
        return pd.DataFrame(levels, columns=["backend", "mode", "concurrency", "aggregate_tok_s"])

    def answers_frame(self) -> Any:
        """The greedy answers: one column per measured backend, one row per prompt."""
        import pandas as pd

        answers = {r["backend"]: r["answers"] for r in self.rows if r.get("answers")}
        return pd.DataFrame(answers, index=list(self.settings.prompts))

    def recommendation(self) -> str:
        return recommend(
            self.rows, max_ppl_increase=self.max_ppl_increase, machine=machine_words(self.machine)
        )

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """``results.csv``, ``sweep.csv``, ``results.json`` (everything, with the date,
        command, machine, settings and recommendation) and ``comparison.png`` in ``out_dir``."""
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            name: out / name
            for name in ("results.csv", "sweep.csv", "results.json", "comparison.png")
        }
        self.table().to_csv(files["results.csv"], index=False, float_format="%.4g")
        self.sweep_frame().to_csv(files["sweep.csv"], index=False, float_format="%.4g")
        everything = {
            "created": self.machine.get("date"),
            "command": self.command,
            "machine": self.machine,
            "settings": self.settings.as_dict(),
            "max_ppl_increase": self.max_ppl_increase,
            "rows": self.rows,
            "recommendation": self.recommendation(),
        }
        files["results.json"].write_text(
            json.dumps(jsonable(everything), indent=2, ensure_ascii=False) + "\n"
        )
        fig = plot_comparison(self)
        fig.savefig(files["comparison.png"], dpi=110, bbox_inches="tight")
        plt.close(fig)
        return files


def describe_machine(threads: int = 1) -> dict[str, Any]:
    """Date, CPU, cores, RAM, GPUs, package versions, load average, and the memory bandwidth
    of the device that decodes (host memory with ``threads`` threads; on a GPU its memory)."""
    report = mach.collect_report()
    on_gpu = mach.gpu_available()
    bw = memory_bandwidth_gbps("cuda" if on_gpu else "cpu", threads=threads)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": report.cpu_model,
        "cpu_vendor": report.cpu_vendor,
        "usable_cpus": report.usable_cpus,
        "physical_cores": report.physical_cores,
        "ram_total_gib": report.ram_total_gib,
        "gpus": [
            {"name": g.name, "memory_gib": g.total_memory_gib, "capability": g.capability_text}
            for g in report.gpus
        ],
        "gpu_usable": on_gpu,
        "os": report.os_name,
        "python": report.python_version,
        "packages": {k: v for k, v in report.packages.items() if v},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "bandwidth_gbps": bw.read_gbps,
        "bandwidth_device": bw.device,
        "bandwidth_threads": bw.threads,
        "gpu_datasheet_gbps": bw.datasheet_gbps,
    }


def machine_words(machine: Mapping[str, Any]) -> str:
    """``this CPU (AMD EPYC, 2 cores)`` or ``this GPU (NVIDIA A10G)``."""
    if machine.get("gpu_usable") and machine.get("gpus"):
        return f"this GPU ({machine['gpus'][0]['name']})"
    return f"this CPU ({machine.get('cpu_model')}, {machine.get('usable_cpus')} cores)"


def default_out_dir(machine: Mapping[str, Any]) -> Path:
    """``docs/results/<cpu-2core | gpu-nvidia-a10g>`` in the checkout, else in the cache."""
    if machine.get("gpu_usable") and machine.get("gpus"):
        slug = "gpu-" + re.sub(r"[^a-z0-9]+", "-", str(machine["gpus"][0]["name"]).lower()).strip(
            "-"
        )
    else:
        slug = f"cpu-{machine.get('usable_cpus') or os.cpu_count()}core"
    root = repo_root()
    return (root / "docs" / "results" if root else cache_dir() / "results") / slug


def skipped_row(backend: Backend, reason: str, status: str = "skipped") -> dict[str, Any]:
    """The row of a backend that did not run: nothing measured, the reason given."""
    return {c: None for c in COLUMNS} | {
        "backend": backend.name,
        "engine": backend.engine,
        "weights": backend.weights,
        "status": status,
        "skipped_reason": reason,
    }


def run(
    backends: str | Sequence[str] | None = None,
    settings: Settings | None = None,
    *,
    log: Log = print,
    machine: Mapping[str, Any] | None = None,
) -> Comparison:
    """Measure ``backends`` (default: all) one after the other, one server at a time. Never
    raises for a backend that cannot run or fails: its row says why."""
    settings = settings or Settings()
    chosen = get_backends(backends)
    machine = dict(machine or describe_machine(settings.threads))
    gpus = ", ".join(g["name"] for g in machine["gpus"]) or "none"
    log(
        f"machine: {machine['cpu_model']}, {machine['usable_cpus']} CPU(s), GPU: {gpus}; "
        f"{machine['bandwidth_device']} memory bandwidth {machine['bandwidth_gbps']:.1f} GB/s"
    )
    dirs = {"base": models.resolve(settings.model, log=log)}
    if any(b.weights_from == "gptq" for b in chosen):
        dirs["gptq"] = models.resolve(settings.gptq_name, log=log)
    if any(models.is_standin(d) for d in dirs.values()) and machine.get("gpu_usable"):
        log("⚠  the OFFLINE STAND-IN (SmolLM2-135M, not Qwen) is measured on this GPU")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(dirs["base"])(heldout_text(settings.eval_topics))[
        "input_ids"
    ]
    eval_ids = [int(i) for i in ids[: settings.eval_tokens]]
    log(f"held-out text: {len(eval_ids)} tokens (topics {', '.join(settings.eval_topics)})")
    rows = []
    for backend in chosen:
        t0 = time.monotonic()
        log(f"\n▶ {backend.name}")
        if reason := skip_reason(backend):
            log(f"  ⏭  SKIPPED: {reason}")
            rows.append(skipped_row(backend, reason))
            continue
        try:
            rows.append(
                measure(backend, str(dirs[backend.weights_from]), settings, eval_ids, log=log)
            )
        except Exception as exc:  # one broken backend must not stop the comparison
            log(f"  ✗ failed: {type(exc).__name__}: {exc}")
            rows.append(
                skipped_row(backend, f"failed: {type(exc).__name__}: {exc}"[:2000], "failed")
            )
        log(f"  ({time.monotonic() - t0:.0f} s)")
    finish_rows(rows, machine)
    if hasattr(os, "getloadavg"):  # a busy machine makes every timing noisier
        machine["load_average_at_end"] = list(os.getloadavg())
    return Comparison(rows=rows, machine=machine, settings=settings)


def finish_rows(rows: list[dict[str, Any]], machine: Mapping[str, Any]) -> None:
    """Derived columns, in place: a server's perplexity from its twin with the same weights
    (when it could not score text), the roofline and its percentage, the top concurrency
    level, the perplexity increase over the reference."""
    by_name = {r["backend"]: r for r in rows}
    for row in (r for r in rows if r.get("status") == "measured"):
        twin = (
            by_name.get(BACKENDS[row["backend"]].twin or "") if row["backend"] in BACKENDS else None
        )
        if number(row.get("perplexity")) is None and twin and number(twin.get("perplexity")):
            row["perplexity"], row["perplexity_source"] = (
                twin["perplexity"],
                f"from {twin['backend']} (same weights)",
            )
        decode = number(row.get("decode_tok_s"))
        if decode and row.get("weight_bytes") and row.get("config_dir"):
            context = int((row.get("prompt_tokens") or 0) + (row.get("new_tokens") or 0) / 2)
            per_token = bytes_per_token(
                int(row["weight_bytes"]),
                row["config_dir"],
                context_tokens=context,
                kv_bytes_per_elem=row.get("kv_bytes_per_elem") or 2,
            )
            row["roofline_tok_s"] = roofline_tokens_per_s(machine["bandwidth_gbps"], per_token)
            row["pct_of_roofline"] = percent_of_roofline(decode, row["roofline_tok_s"])
        levels = [lv for lv in row.get("sweep") or [] if number(lv.get("aggregate_tok_s"))]
        if levels:
            top = max(levels, key=lambda lv: lv["concurrency"])
            row["aggregate_tok_s"], row["at_concurrency"] = (
                top["aggregate_tok_s"],
                top["concurrency"],
            )
    ref = reference(rows)
    for row in rows:
        if ref and number(row.get("perplexity")):
            row["ppl_increase_pct"] = 100.0 * (row["perplexity"] / ref["perplexity"] - 1.0)
