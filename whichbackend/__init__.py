"""Which backend should I use? Every way of running the same model on this machine measured in
one run next to its memory-bandwidth limit (notebook 06, ``python -m whichbackend``): load
time, TTFT, decode tokens/s and its share of the roofline, aggregate tokens/s under concurrency,
peak memory, disk, perplexity, the answers. A backend that cannot run gets a row saying why; the
recommendation is computed from the table (any subset of rows, missing columns, ties).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labhelpers import machine as mach
from labhelpers import models
from labhelpers.envs import jsonable
from labhelpers.measure import QualityVerdict, heldout_text, quality_verdict
from labhelpers.roofline import (
    bytes_per_token,
    memory_bandwidth_gbps,
    percent_of_roofline,
    roofline_tokens_per_s,
)
from whichbackend.backends import Backend, Settings, get_backends, skip_reason
from whichbackend.runs import measure

_Log = Callable[[str], Any]
#: The table's columns, in order (results.csv).
_COLUMNS = tuple(
    """backend engine weights model status threads load_s ttft_s decode_tok_s roofline_tok_s
    pct_of_roofline aggregate_tok_s at_concurrency peak_mem_gb memory_kind disk_gb perplexity
    ppl_increase_pct perplexity_source new_tokens prompt_tokens engine_version note
    skipped_reason""".split()
)


@dataclass
class Comparison:
    """:func:`run`'s result: one row per backend (with its sweep and answers), the machine, the
    settings. :meth:`table` is the comparison; :meth:`write` saves it."""

    rows: list[dict[str, Any]]
    machine: dict[str, Any]
    settings: Settings
    command: str = ""
    max_ppl_increase: float = 0.5

    def table(self) -> Any:
        import pandas as pd

        table = pd.DataFrame([{c: r.get(c) for c in _COLUMNS} for r in self.rows])
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

    def quality(self) -> list[QualityVerdict]:
        """The quality sanity check (notebook 08 section 7) of every backend with answers against
        the quality reference (fp32, else bf16): its greedy answer to the first prompt
        (``measure.SANITY_PROMPT`` by default) and its perplexity. Empty without a reference."""
        ref = _reference(self.rows)
        if ref is None or not ref.get("answers"):
            return []
        return [
            quality_verdict(
                r["answers"][0],
                ref["answers"][0],
                _number(r.get("perplexity")),
                _number(ref.get("perplexity")),
                label=f"{r['backend']} vs {ref['backend']}",
            )  # fmt: skip
            for r in self.rows
            if r is not ref and r.get("answers")
        ]

    def recommendation(self) -> str:
        words = _machine_words(self.machine)
        return _recommend(self.rows, max_ppl_increase=self.max_ppl_increase, machine=words)

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """``results.csv``, ``sweep.csv``, ``results.json`` (everything, with the date, command,
        machine, settings and recommendation) and ``comparison.png`` in ``out_dir``."""
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {n: out / n for n in ("results.csv", "sweep.csv", "results.json", "comparison.png")}
        self.table().to_csv(files["results.csv"], index=False, float_format="%.4g")
        self.sweep_frame().to_csv(files["sweep.csv"], index=False, float_format="%.4g")
        everything = dict(
            created=self.machine.get("date"), command=self.command, machine=self.machine
        )
        everything |= dict(settings=self.settings.as_dict(), max_ppl_increase=self.max_ppl_increase)
        everything |= dict(rows=self.rows, recommendation=self.recommendation())
        everything["quality"] = [dataclasses.asdict(v) for v in self.quality()]
        text = json.dumps(jsonable(everything), indent=2, ensure_ascii=False)
        files["results.json"].write_text(text + "\n")
        fig = plot_comparison(self)
        fig.savefig(files["comparison.png"], dpi=110, bbox_inches="tight")
        plt.close(fig)
        return files


def describe_machine(threads: int = 1) -> dict[str, Any]:
    """Date, CPU, cores, RAM, GPUs, package versions, load average, and the memory bandwidth of
    the device that decodes (host memory with ``threads`` threads; on a GPU its memory, and host
    memory's too for the backends that decode on the CPU there: IPEX-LLM, OpenVINO, llama.cpp)."""
    report, on_gpu = mach.collect_report(), mach.gpu_available()
    bw = memory_bandwidth_gbps("cuda" if on_gpu else "cpu", threads=threads)
    cpu_bw = memory_bandwidth_gbps("cpu", threads=threads) if on_gpu else bw
    gpus = [
        {"name": g.name, "memory_gib": g.total_memory_gib, "capability": g.capability_text}
        for g in report.gpus
    ]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": report.cpu_model, "cpu_vendor": report.cpu_vendor,
        "usable_cpus": report.usable_cpus, "physical_cores": report.physical_cores,
        "ram_total_gib": report.ram_total_gib, "gpus": gpus, "gpu_usable": on_gpu,
        "os": report.os_name, "python": report.python_version,
        "packages": {k: v for k, v in report.packages.items() if v},
        "load_average_at_start": list(os.getloadavg()),
        "bandwidth_gbps": bw.read_gbps, "bandwidth_device": bw.device,
        "bandwidth_threads": bw.threads, "gpu_datasheet_gbps": bw.datasheet_gbps,
        "cpu_bandwidth_gbps": cpu_bw.read_gbps,
    }  # fmt: skip


def _machine_words(machine: Mapping[str, Any]) -> str:
    """``this CPU (AMD EPYC, 2 cores)`` or ``this GPU (NVIDIA A10G)``."""
    if machine.get("gpu_usable") and machine.get("gpus"):
        return f"this GPU ({machine['gpus'][0]['name']})"
    return f"this CPU ({machine.get('cpu_model')}, {machine.get('usable_cpus')} cores)"


def _skipped_row(backend: Backend, reason: str, status: str = "skipped") -> dict[str, Any]:
    """The row of a backend that did not run: nothing measured, the reason given."""
    named = dict(backend=backend.name, engine=backend.engine, weights=backend.weights)
    return dict.fromkeys(_COLUMNS) | named | dict(status=status, skipped_reason=reason)


def run(backends: str | Sequence[str] | None = None, settings: Settings | None = None, *,
        log: _Log = print, machine: Mapping[str, Any] | None = None) -> Comparison:  # fmt: skip
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

    ids = AutoTokenizer.from_pretrained(dirs["base"])(heldout_text())["input_ids"]
    eval_ids = [int(i) for i in ids[: settings.eval_tokens]]
    log(f"held-out text: {len(eval_ids)} tokens")
    rows = []
    for backend in chosen:
        t0 = time.monotonic()
        log(f"\n▶ {backend.name}")
        if reason := skip_reason(backend):
            log(f"  ⏭  SKIPPED: {reason}")
            rows.append(_skipped_row(backend, reason))
            continue
        try:
            rows.append(
                measure(backend, str(dirs[backend.weights_from]), settings, eval_ids, log=log)
            )
        except Exception as exc:  # one broken backend must not stop the comparison
            log(f"  ✗ failed: {type(exc).__name__}: {exc}")
            rows.append(
                _skipped_row(backend, f"failed: {type(exc).__name__}: {exc}"[:2000], "failed")
            )
        log(f"  ({time.monotonic() - t0:.0f} s)")
    _finish_rows(rows, machine)
    machine["load_average_at_end"] = list(os.getloadavg())  # a busy machine: noisier timings
    return Comparison(rows=rows, machine=machine, settings=settings)


# --------------------------------------------------------------------------- the table

#: Quality references for the perplexity cost, in order of preference.
_REFERENCES = ("transformers-fp32", "transformers-bf16", "vllm-bf16")


def _number(value: Any) -> float | None:
    """A finite number, else None (NaN from pandas, None, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _records(table: Any) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN turned into None (a DataFrame or dicts)."""
    return jsonable(table.to_dict("records") if hasattr(table, "to_dict") else list(table))


def _reference(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The quality reference: the first of :data:`_REFERENCES` that has a perplexity."""
    by_name = {r.get("backend"): r for r in rows if _number(r.get("perplexity"))}
    return next((by_name[n] for n in _REFERENCES if n in by_name), None)


def _finish_rows(rows: list[dict[str, Any]], machine: Mapping[str, Any]) -> None:
    """Derived columns, in place: a server's perplexity from its twin with the same weights
    (when it could not score text), the roofline (host memory's for CPU-only backends) and its
    percentage at the average context, the top concurrency level, the perplexity increase over
    the reference."""
    by_name = {r["backend"]: r for r in rows}
    for row in (r for r in rows if r.get("status") == "measured"):
        backend = get_backends([row["backend"]])[0]
        twin = by_name.get(backend.twin or "")
        if _number(row.get("perplexity")) is None and twin and _number(twin.get("perplexity")):
            row["perplexity"] = twin["perplexity"]
            row["perplexity_source"] = f"from {twin['backend']} (same weights)"
        decode = _number(row.get("decode_tok_s"))
        if decode and row.get("weight_bytes") and row.get("config_dir"):
            context = int((row.get("prompt_tokens") or 0) + (row.get("new_tokens") or 0) / 2)
            kv = row.get("kv_bytes_per_elem") or 2
            per_token = bytes_per_token(
                int(row["weight_bytes"]),
                row["config_dir"],
                context_tokens=context,
                kv_bytes_per_elem=kv,
            )
            cpu = backend.cpu_only and machine.get("cpu_bandwidth_gbps")
            bandwidth = machine["cpu_bandwidth_gbps"] if cpu else machine["bandwidth_gbps"]
            row["roofline_tok_s"] = roofline_tokens_per_s(bandwidth, per_token)
            row["pct_of_roofline"] = percent_of_roofline(decode, row["roofline_tok_s"])
        levels = [lv for lv in row.get("sweep") or [] if _number(lv.get("aggregate_tok_s"))]
        if levels:
            top = max(levels, key=lambda lv: lv["concurrency"])
            row["aggregate_tok_s"], row["at_concurrency"] = (
                top["aggregate_tok_s"],
                top["concurrency"],
            )
    ref = _reference(rows)
    for row in rows:
        if ref and _number(row.get("perplexity")):
            row["ppl_increase_pct"] = 100.0 * (row["perplexity"] / ref["perplexity"] - 1.0)


def _best(
    rows: Sequence[Mapping[str, Any]], key: str, tolerance: float
) -> tuple[Mapping[str, Any], list[Mapping[str, Any]]]:
    """The row with the highest ``key``; among rows within ``tolerance`` of it (ties), the
    one with the least peak memory wins. Returns (winner, the other tied rows)."""
    top = max(_number(r[key]) or 0.0 for r in rows)
    tied = [r for r in rows if (_number(r[key]) or 0.0) >= top * (1 - tolerance)]
    tied.sort(key=lambda r: (_number(r.get("peak_mem_gb")) or math.inf, -(_number(r[key]) or 0.0)))
    return tied[0], tied[1:]


def _tie_text(
    winner: Mapping[str, Any], others: Sequence[Mapping[str, Any]], tolerance: float
) -> str:
    if not others:
        return ""
    names, verb = ", ".join(str(r["backend"]) for r in others), "is" if len(others) == 1 else "are"
    return (
        f" {names} {verb} as good (within {tolerance:.0%}, i.e. a tie on a noisy machine); "
        f"{winner['backend']} is chosen for its smaller memory."
    )


def _recommend(table: Any, *, max_ppl_increase: float = 0.5, tie_tolerance: float = 0.05,
               machine: str = "this machine") -> str:  # fmt: skip
    """The recommendation, as bullet lines computed from the table (notebook 06): for one user,
    the fastest single-stream decode among backends whose perplexity is at most
    ``max_ppl_increase`` (0.5 = +50%) above the reference (fp32, else bf16), backends within
    ``tie_tolerance`` tying and the smaller peak memory winning; for many users, the highest
    aggregate tokens/s at the top concurrency; the smallest footprint, the quality cost of each
    backend, and what was not measured and why. Rows need ``backend``, ``status`` and
    ``decode_tok_s``; other columns are used when present."""
    rows = _records(table)
    done = [r for r in rows if r.get("status", "measured") == "measured"]
    measured = [r for r in done if _number(r.get("decode_tok_s"))]
    missing = [r for r in rows if r not in measured]
    lines: list[str] = []
    if not measured:
        lines.append(f"No backend was measured on {machine}, so there is nothing to recommend.")
    else:
        lines += _verdicts(measured, max_ppl_increase, tie_tolerance, machine)
    if missing:
        why = [
            f"{r.get('backend')} ({r.get('skipped_reason') or 'no measurement'})" for r in missing
        ]
        lines.append(f"Not measured here: {'; '.join(why)}.")
    return "\n".join(f"- {line}" for line in lines)


def _verdicts(
    measured: list[dict[str, Any]], max_increase: float, tolerance: float, machine: str
) -> list[str]:
    ref = _reference(measured)
    ref_ppl = _number(ref["perplexity"]) if ref else None

    def good(row: Mapping[str, Any]) -> bool:
        ppl = _number(row.get("perplexity"))
        return ppl is None or ref_ppl is None or ppl <= ref_ppl * (1 + max_increase)

    candidates = [r for r in measured if good(r)]
    lines = []
    if not candidates:
        lines.append(
            f"Every measured backend loses more than {max_increase:.0%} perplexity against "
            f"{ref['backend'] if ref else 'the reference'}: the choice below ignores quality."
        )
        candidates = measured
    one, tied = _best(candidates, "decode_tok_s", tolerance)
    pct, mem, ttft = (_number(one.get(k)) for k in ("pct_of_roofline", "peak_mem_gb", "ttft_s"))
    lines.append(
        f"For one user on {machine}: {one['backend']} — {one['decode_tok_s']:.1f} tokens/s decode"
        + (f" ({pct:.0f}% of the memory-bandwidth roofline)" if pct is not None else "")
        + (f", first token after {ttft:.2f} s" if ttft is not None else "")
        + (f", {mem:.2f} GB peak memory" if mem is not None else "")
        + "."
        + _tie_text(one, tied, tolerance)
    )
    many_rows = [r for r in candidates if _number(r.get("aggregate_tok_s"))]
    if many_rows:
        many, tied = _best(many_rows, "aggregate_tok_s", tolerance)
        users = many.get("at_concurrency")
        gain = many["aggregate_tok_s"] / one["decode_tok_s"]
        lines.append(
            f"For {users or 'many'} concurrent users: {many['backend']} — "
            f"{many['aggregate_tok_s']:.0f} tokens/s in total, {gain:.1f}x what "
            f"{one['backend']} decodes for one user." + _tie_text(many, tied, tolerance)
        )
    else:
        lines.append("No backend was measured under concurrency: no advice for many users.")
    with_mem = [r for r in candidates if _number(r.get("peak_mem_gb"))]
    if with_mem:
        per_gb = [{**r, "per_gb": r["decode_tok_s"] / r["peak_mem_gb"]} for r in with_mem]
        dense, tied = _best(per_gb, "per_gb", tolerance)
        lines.append(
            f"Most speed per GB of memory: {dense['backend']} — {dense['per_gb']:.1f} tokens/s "
            f"per GB ({dense['decode_tok_s']:.1f} tokens/s in {dense['peak_mem_gb']:.2f} GB)."
            + _tie_text(dense, tied, tolerance)
        )
        small = min(with_mem, key=lambda r: r["peak_mem_gb"])
        disk = _number(small.get("disk_gb"))
        lines.append(
            f"Smallest footprint: {small['backend']} — {small['peak_mem_gb']:.2f} GB peak memory"
            + (f", {disk:.2f} GB on disk" if disk is not None else "")
            + "."
        )
    lines.append(_quality_line(measured, ref, max_increase))
    return lines


def _quality_line(
    measured: list[dict[str, Any]], ref: Mapping[str, Any] | None, max_increase: float
) -> str:
    scored = [r for r in measured if _number(r.get("perplexity"))]
    if not scored:
        return "Quality: no perplexity was measured, so the quality cost is unknown."
    if ref is None:
        values = ", ".join(f"{r['backend']} {r['perplexity']:.2f}" for r in scored)
        return (
            f"Quality (perplexity on the held-out text, lower is better): {values}; without an "
            f"unquantized reference ({', '.join(_REFERENCES)}) the cost of quantizing is unknown."
        )
    ref_ppl = float(ref["perplexity"])
    costs, costly, unknown = [], [], []
    for row in measured:
        ppl = _number(row.get("perplexity"))
        if ppl is None:
            unknown.append(str(row["backend"]))
            continue
        change = 100 * (ppl / ref_ppl - 1)
        if row["backend"] != ref["backend"]:
            costs.append(f"{row['backend']} {change:+.1f}%")
        if ppl > ref_ppl * (1 + max_increase):
            costly.append(str(row["backend"]))
    text = (
        f"Quality (perplexity on the held-out text, lower is better; reference {ref['backend']} "
        f"= {ref_ppl:.2f}): {', '.join(costs) or 'no other backend scored'}."
    )
    if costly:
        text += f" More than +{max_increase:.0%} is too costly here: {', '.join(costly)}."
    if unknown:
        text += f" Not scored: {', '.join(unknown)}."
    return text


# --------------------------------------------------------------------------- charts


def plot_comparison(table: Any, sweep: Any = None, *, title: str | None = None) -> Any:
    """Three panels (notebook 06): decode tokens/s against peak memory (up and to the left is
    better), aggregate tokens/s against concurrency, and perplexity. ``table``: the rows (or a
    ``Comparison``, whose sweep and title are used); ``sweep``: rows with backend, concurrency,
    aggregate_tok_s. Returns the Figure."""
    import matplotlib.pyplot as plt

    if hasattr(table, "sweep_frame"):
        sweep = table.sweep_frame() if sweep is None else sweep
        machine = table.machine
        names = sorted({str(r.get("model")) for r in table.rows if r.get("model")})
        title = title or (
            f"{', '.join(names) or 'model'} on {machine.get('cpu_model')} · "
            f"{machine.get('usable_cpus')} CPU(s) · GPU: "
            f"{', '.join(g['name'] for g in machine.get('gpus') or []) or 'none'} · "
            f"{str(machine.get('date', ''))[:10]}"
        )
        table = table.rows
    rows = [r for r in _records(table) if _number(r.get("decode_tok_s"))]
    levels = _records(sweep) if sweep is not None else []
    colors = {r["backend"]: f"C{i}" for i, r in enumerate(rows)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    for r in rows:
        if _number(r.get("peak_mem_gb")):
            ax.scatter(r["peak_mem_gb"], r["decode_tok_s"], s=60, color=colors[r["backend"]])
            point = (r["peak_mem_gb"], r["decode_tok_s"])
            ax.annotate(r["backend"], point, xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set(xlabel="peak memory, GB", ylabel="single-stream decode, tokens/s")
    ax.set_title("speed vs memory (up-left is better)", fontsize=10)
    ax = axes[1]
    for name in colors:
        mine = [
            lv for lv in levels if lv.get("backend") == name and _number(lv.get("aggregate_tok_s"))
        ]
        pts = sorted((lv["concurrency"], lv["aggregate_tok_s"]) for lv in mine)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colors[name], label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted({lv["concurrency"] for lv in levels if lv.get("backend") in colors})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set(xlabel="concurrent requests (batch size in-process)", ylabel="aggregate output tokens/s")
    ax.set_title("throughput vs concurrency", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[2]
    scored = [r for r in rows if _number(r.get("perplexity"))]
    names, values = [r["backend"] for r in scored], [r["perplexity"] for r in scored]
    ax.barh(names, values, color=[colors[n] for n in names])
    if ref := _reference(scored):
        ax.axvline(ref["perplexity"], color="k", linestyle=":", label=f"{ref['backend']}")
        ax.legend(fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity on held-out text (lower is better)")
    ax.set_title("quality", fontsize=10)
    for a in axes:
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
