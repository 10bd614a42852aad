"""``python -m whichbackend``: notebook 06's measurement from a terminal, the same table as
CSV/JSON and a chart, for comparing machines::

    python -m whichbackend --out-dir docs/results/cpu-2core
    python -m whichbackend --backends transformers-bf16,vllm-bf16 --max-new-tokens 32
    python -m whichbackend --list      # which backends can run here, and why not
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from labhelpers.files import cache_dir
from whichbackend import Settings, get_backends, run, skip_reason


def _parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """The command line as (settings, the other options)."""
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m whichbackend",
        description="Measure every way of running one model on this machine (notebook 06).",
    )
    names = ", ".join(b.name for b in get_backends(None))
    p.add_argument("--backends", default="all", help=f"comma-separated: {names}")
    p.add_argument("--model", default=d.model, help="models.json name, hub id or folder")
    p.add_argument("--gptq-model", help="GPTQ checkpoint (default: <model>-GPTQ-Int4)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per prompt")
    p.add_argument("--concurrency", default=",".join(map(str, d.concurrency)))
    p.add_argument("--requests-per-slot", type=int, default=d.requests_per_slot)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--eval-window", type=int, default=d.eval_window)
    p.add_argument("--eval-stride", type=int, default=d.eval_stride)
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads, single stream")
    p.add_argument("--max-ppl-increase", type=float, default=0.5, help="0.5 = +50%% perplexity")
    p.add_argument("--out-dir", help="default: docs/results/<machine>")
    p.add_argument("--list", action="store_true", help="list the backends and exit")
    args = p.parse_args(argv)
    keys = "model gptq_model max_new_tokens repeats requests_per_slot eval_tokens eval_window"
    try:
        settings = Settings(
            **{k: getattr(args, k) for k in f"{keys} eval_stride threads".split()},
            concurrency=tuple(int(c) for c in args.concurrency.split(",") if c.strip()),
        )
        get_backends(args.backends)
    except ValueError as exc:
        p.error(str(exc))
    return settings, args


def _default_out_dir(machine: Mapping[str, Any]) -> Path:
    """``docs/results/<cpu-2core | gpu-nvidia-a10g>`` in the checkout, else in the cache."""
    if machine.get("gpu_usable") and machine.get("gpus"):
        slug = "gpu-" + re.sub(r"[^a-z0-9]+", "-", str(machine["gpus"][0]["name"]).lower()).strip(
            "-"
        )
    else:
        slug = f"cpu-{machine.get('usable_cpus')}core"
    checkout = Path(__file__).resolve().parents[1]  # the course checkout, if installed from one
    results = checkout / "docs" / "results" if (checkout / "notebooks").is_dir() else None
    return (results or cache_dir() / "results") / slug


def _main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table and the recommendation, write the files. Exit code 1 only when no
    backend could be measured."""
    settings, args = _parse_args(argv)
    if args.list:
        for backend in get_backends(args.backends):
            print(f"{backend.name:24} {skip_reason(backend) or 'can run here'}")
        return 0
    result = run(args.backends, settings)
    result.max_ppl_increase = args.max_ppl_increase
    words = sys.argv[1:] if argv is None else argv
    result.command = shlex.join(["python", "-m", "whichbackend", *words])
    files = result.write(Path(args.out_dir) if args.out_dir else _default_out_dir(result.machine))
    shown = "status load_s ttft_s decode_tok_s pct_of_roofline aggregate_tok_s peak_mem_gb disk_gb"
    table = result.table().set_index("backend")[[*shown.split(), "perplexity"]]
    print("\n" + table.round(3).to_string())
    print("\n" + result.recommendation())
    for name, path in files.items():
        print(f"wrote {name}: {path}")
    return 0 if any(r.get("status") == "measured" for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(_main())
