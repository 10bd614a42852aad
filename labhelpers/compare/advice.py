"""Advice from notebook 06's table: the recommendation computed from the numbers
(:func:`recommend`) and the charts (:func:`plot_comparison`). Both take the rows (dicts or a
DataFrame) and work on any subset: skipped backends, missing columns and ties included."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from labhelpers.envs import jsonable

#: Quality references for the perplexity cost, in order of preference.
REFERENCES = ("transformers-fp32", "transformers-bf16", "vllm-bf16")


def number(value: Any) -> float | None:
    """A finite number, else None (NaN from pandas, None, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def as_records(table: Any) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN turned into None (a DataFrame or dicts)."""
    return jsonable(table.to_dict("records") if hasattr(table, "to_dict") else list(table))


def reference(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The quality reference: the first of :data:`REFERENCES` that has a perplexity."""
    by_name = {r.get("backend"): r for r in rows if number(r.get("perplexity"))}
    return next((by_name[n] for n in REFERENCES if n in by_name), None)


def _best(
    rows: Sequence[Mapping[str, Any]], key: str, tolerance: float
) -> tuple[Mapping[str, Any], list[Mapping[str, Any]]]:
    """The row with the highest ``key``; among rows within ``tolerance`` of it (ties), the
    one with the least peak memory wins. Returns (winner, the other tied rows)."""
    top = max(number(r[key]) or 0.0 for r in rows)
    tied = [r for r in rows if (number(r[key]) or 0.0) >= top * (1 - tolerance)]
    tied.sort(key=lambda r: (number(r.get("peak_mem_gb")) or math.inf, -(number(r[key]) or 0.0)))
    return tied[0], tied[1:]


def _tie_text(
    winner: Mapping[str, Any], others: Sequence[Mapping[str, Any]], tolerance: float
) -> str:
    if not others:
        return ""
    names = ", ".join(str(r["backend"]) for r in others)
    verb = "is" if len(others) == 1 else "are"
    return (
        f" {names} {verb} as good (within {tolerance:.0%}, i.e. a tie on a noisy machine); "
        f"{winner['backend']} is chosen for its smaller memory."
    )


def recommend(
    table: Any,
    *,
    max_ppl_increase: float = 0.5,
    tie_tolerance: float = 0.05,
    machine: str = "this machine",
) -> str:
    """The recommendation, as bullet lines computed from the table (notebook 06):

    * for one user: the fastest single-stream decode among backends whose perplexity is
      at most ``max_ppl_increase`` (0.5 = +50%) above the reference (fp32, else bf16);
      backends within ``tie_tolerance`` of the fastest tie, and the smaller peak memory
      wins;
    * for many users: the highest aggregate tokens/s at the top concurrency level;
    * the smallest footprint (peak memory), the quality cost of each backend, and what
      was not measured here and why.

    Rows need ``backend``, ``status`` and ``decode_tok_s``; the other columns are used
    when present. A table with nothing measured gets a sentence saying so.
    """
    rows = as_records(table)
    measured = [
        r
        for r in rows
        if r.get("status", "measured") == "measured" and number(r.get("decode_tok_s"))
    ]
    missing = [r for r in rows if r not in measured]
    lines: list[str] = []
    if not measured:
        lines.append(f"No backend was measured on {machine}, so there is nothing to recommend.")
    else:
        lines += _verdicts(measured, max_ppl_increase, tie_tolerance, machine)
    if missing:
        why = "; ".join(
            f"{r.get('backend')} ({r.get('skipped_reason') or 'no measurement'})" for r in missing
        )
        lines.append(f"Not measured here: {why}.")
    return "\n".join(f"- {line}" for line in lines)


def _verdicts(
    measured: list[dict[str, Any]], max_increase: float, tolerance: float, machine: str
) -> list[str]:
    ref = reference(measured)
    ref_ppl = number(ref["perplexity"]) if ref else None

    def good(row: Mapping[str, Any]) -> bool:
        ppl = number(row.get("perplexity"))
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
    pct = number(one.get("pct_of_roofline"))
    mem = number(one.get("peak_mem_gb"))
    ttft = number(one.get("ttft_s"))
    lines.append(
        f"For one user on {machine}: {one['backend']} — {one['decode_tok_s']:.1f} tokens/s decode"
        + (f" ({pct:.0f}% of the memory-bandwidth roofline)" if pct is not None else "")
        + (f", first token after {ttft:.2f} s" if ttft is not None else "")
        + (f", {mem:.2f} GB peak memory" if mem is not None else "")
        + "."
        + _tie_text(one, tied, tolerance)
    )
    many_rows = [r for r in candidates if number(r.get("aggregate_tok_s"))]
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
    with_mem = [r for r in candidates if number(r.get("peak_mem_gb"))]
    if with_mem:
        per_gb = [{**r, "per_gb": r["decode_tok_s"] / r["peak_mem_gb"]} for r in with_mem]
        dense, tied = _best(per_gb, "per_gb", tolerance)
        lines.append(
            f"Most speed per GB of memory: {dense['backend']} — {dense['per_gb']:.1f} tokens/s "
            f"per GB ({dense['decode_tok_s']:.1f} tokens/s in {dense['peak_mem_gb']:.2f} GB)."
            + _tie_text(dense, tied, tolerance)
        )
        small = min(with_mem, key=lambda r: r["peak_mem_gb"])
        disk = number(small.get("disk_gb"))
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
    scored = [r for r in measured if number(r.get("perplexity"))]
    if not scored:
        return "Quality: no perplexity was measured, so the quality cost is unknown."
    if ref is None:
        values = ", ".join(f"{r['backend']} {r['perplexity']:.2f}" for r in scored)
        return (
            f"Quality (perplexity on the held-out text, lower is better): {values}; without an "
            f"unquantized reference ({', '.join(REFERENCES)}) the cost of quantizing is unknown."
        )
    ref_ppl = float(ref["perplexity"])
    costs, costly, unknown = [], [], []
    for row in measured:
        ppl = number(row.get("perplexity"))
        if ppl is None:
            unknown.append(str(row["backend"]))
            continue
        change = 100 * (ppl / ref_ppl - 1)
        if row["backend"] != ref["backend"]:
            costs.append(f"{row['backend']} {change:+.1f}%")
        if ppl > ref_ppl * (1 + max_increase):
            costly.append(str(row["backend"]))
    text = (
        f"Quality (perplexity on the held-out text, lower is better; reference "
        f"{ref['backend']} = {ref_ppl:.2f}): " + (", ".join(costs) or "no other backend scored")
    )
    text += "."
    if costly:
        text += f" More than +{max_increase:.0%} is too costly here: {', '.join(costly)}."
    if unknown:
        text += f" Not scored: {', '.join(unknown)}."
    return text


# --------------------------------------------------------------------------- charts


def plot_comparison(
    table: Any, sweep: Any = None, *, title: str | None = None, reference_name: str | None = None
) -> Any:
    """Three panels (notebook 06): decode tokens/s against peak memory (up and to the left
    is better), aggregate tokens/s against concurrency, and perplexity. ``table``: the
    rows (or a ``Comparison``, whose sweep and title are used);
    ``sweep``: rows with backend, concurrency, aggregate_tok_s. Returns the Figure."""
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
    rows = [r for r in as_records(table) if number(r.get("decode_tok_s"))]
    levels = as_records(sweep) if sweep is not None else []
    colors = {r["backend"]: f"C{i}" for i, r in enumerate(rows)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    for r in rows:
        if number(r.get("peak_mem_gb")):
            ax.scatter(r["peak_mem_gb"], r["decode_tok_s"], s=60, color=colors[r["backend"]])
            point = (r["peak_mem_gb"], r["decode_tok_s"])
            ax.annotate(r["backend"], point, xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel("peak memory, GB")
    ax.set_ylabel("single-stream decode, tokens/s")
    ax.set_title("speed vs memory (up-left is better)", fontsize=10)
    ax = axes[1]
    for name in colors:
        mine = [lv for lv in levels if lv.get("backend") == name]
        pts = sorted(
            (lv["concurrency"], lv["aggregate_tok_s"])
            for lv in mine
            if number(lv.get("aggregate_tok_s"))
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colors[name], label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted({lv["concurrency"] for lv in levels if lv.get("backend") in colors})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrent requests (batch size in-process)")
    ax.set_ylabel("aggregate output tokens/s")
    ax.set_title("throughput vs concurrency", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[2]
    scored = [r for r in rows if number(r.get("perplexity"))]
    names, values = [r["backend"] for r in scored], [r["perplexity"] for r in scored]
    ax.barh(names, values, color=[colors[n] for n in names])
    ref = reference(scored)
    if reference_name is not None:
        ref = next((r for r in scored if r["backend"] == reference_name), None)
    if ref:
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
