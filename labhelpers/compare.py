"""Which backend should I use? One measured comparison of every way of running the same
model on this machine, next to its memory-bandwidth limit (notebook 06_which_backend).

For each backend (see :data:`labhelpers.backends.BACKENDS`): load time, TTFT, decode
tokens/s and its share of the roofline, aggregate tokens/s under concurrency, peak memory,
size on disk, perplexity on the held-out text of notebook 02, and the answers to fixed
prompts. A backend that cannot run here gets a row that says why. The recommendation is
computed from the table (:func:`recommend`), never written by hand.

Command line (the same table as CSV/JSON plus a chart, for comparing machines)::

    python -m labhelpers.compare --out-dir docs/results/cpu-2core
    python -m labhelpers.compare --backends transformers-bf16,vllm-bf16 --max-new-tokens 32
    python -m labhelpers.compare --list          # which backends can run here, and why not

Importing this module is instant (pandas, matplotlib and torch are imported inside the
functions that use them) and works in every course environment: the IPEX-LLM environment
runs ``python -m labhelpers.compare --worker JOB`` for its row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labhelpers import backends as bk
from labhelpers import bench, env, measurement, models, paths, quant, verdict
from labhelpers.verdict import number, plot_comparison, recommend

Log = Callable[[str], Any]

#: The table's columns, in order (results.csv).
COLUMNS = (
    "backend", "engine", "weights", "model", "status", "threads",
    "load_s", "ttft_s", "decode_tok_s", "roofline_tok_s", "pct_of_roofline",
    "aggregate_tok_s", "at_concurrency", "peak_mem_gb", "memory_kind", "disk_gb",
    "perplexity", "ppl_increase_pct", "perplexity_source",
    "new_tokens", "prompt_tokens", "engine_version", "note", "skipped_reason",
)  # fmt: skip


class WorkerError(RuntimeError):
    """A backend's worker process failed; the message ends with its log (notebook 06)."""


@dataclass
class Comparison:
    """The result of :func:`run`: one row per backend (with its sweep and answers), the
    machine, the settings. ``table()`` is the comparison; ``write()`` saves it (notebook 06)."""

    rows: list[dict[str, Any]]
    machine: dict[str, Any]
    settings: bk.Settings
    command: str = ""
    max_ppl_increase: float = 0.5

    def table(self) -> Any:
        """One row per backend, the columns of :data:`COLUMNS` (a pandas DataFrame)."""
        import pandas as pd

        table = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in self.rows])
        return table.astype({"at_concurrency": "Int64"})

    def sweep_frame(self) -> Any:
        """Aggregate tokens/s per backend and concurrency level (a pandas DataFrame)."""
        import pandas as pd

        levels = [
            {"backend": r["backend"], "mode": r.get("sweep_mode"), **level}
            for r in self.rows
            for level in r.get("sweep") or []
        ]
        return pd.DataFrame(levels, columns=["backend", "mode", "concurrency", "aggregate_tok_s"])

    def answers_frame(self) -> Any:
        """The greedy answers, one column per measured backend, one row per prompt."""
        import pandas as pd

        answers = {r["backend"]: r["answers"] for r in self.rows if r.get("answers")}
        return pd.DataFrame(answers, index=list(self.settings.prompts))

    def recommendation(self, **kwargs: Any) -> str:
        """:func:`recommend` on this table (``max_ppl_increase`` of this comparison and
        the machine's description unless given)."""
        kwargs.setdefault("max_ppl_increase", self.max_ppl_increase)
        kwargs.setdefault("machine", machine_words(self.machine))
        return recommend(self.rows, **kwargs)

    def to_json(self) -> dict[str, Any]:
        """Everything: date, command, machine, settings, rows (with sweeps and answers) and
        the recommendation."""
        return {
            "created": self.machine.get("date"),
            "command": self.command,
            "machine": self.machine,
            "settings": self.settings.as_dict(),
            "max_ppl_increase": self.max_ppl_increase,
            "rows": self.rows,
            "recommendation": self.recommendation(),
        }

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``results.csv``, ``sweep.csv``, ``results.json`` and ``comparison.png``
        into ``out_dir`` (created). Returns the paths by name."""
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {name: out / name for name in ("results.csv", "sweep.csv", "results.json")}
        self.table().to_csv(files["results.csv"], index=False, float_format="%.4g")
        self.sweep_frame().to_csv(files["sweep.csv"], index=False, float_format="%.4g")
        text = json.dumps(_clean(self.to_json()), indent=2, ensure_ascii=False)
        files["results.json"].write_text(text + "\n", encoding="utf-8")
        fig = plot_comparison(self)
        files["comparison.png"] = out / "comparison.png"
        fig.savefig(files["comparison.png"], dpi=110, bbox_inches="tight")
        plt.close(fig)
        return files


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# --------------------------------------------------------------------------- the machine


def describe_machine(threads: int = 1) -> dict[str, Any]:
    """Date, CPU, cores, RAM, GPUs, package versions, load average and memory bandwidth
    (measured with ``threads`` threads, the single-stream setting; on a GPU the
    datasheet bandwidth of the card from ``labhelpers/data/gpus.json``) (notebook 06)."""
    import datetime

    from labhelpers import sizing

    report = env.collect_report()
    bw = bench.memory_bandwidth_gbps(threads=threads)
    gpu_bw = None
    if report.gpus and env.gpu_available():
        try:
            gpu_bw = sizing.GpuSpec.from_gpu_info(report.gpus[0]).bandwidth_gbps
        except sizing.SizingError:
            gpu_bw = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": report.cpu_model,
        "cpu_vendor": report.cpu_vendor,
        "usable_cpus": report.usable_cpus,
        "physical_cores": report.physical_cores,
        "ram_total_gb": report.ram_total_gb,
        "gpus": [
            {"name": g.name, "memory_gb": g.total_memory_gb, "capability": g.capability_text}
            for g in report.gpus
        ],
        "gpu_usable": env.gpu_available(),
        "os": report.os_pretty,
        "python": report.python_version,
        "packages": {k: v for k, v in report.packages.items() if v},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_bandwidth_gbps": bw.read_gbps,
        "cpu_bandwidth_threads": bw.threads,
        "gpu_bandwidth_gbps": gpu_bw,
        "gpu_bandwidth_source": "datasheet (labhelpers/data/gpus.json)" if gpu_bw else None,
    }


def machine_words(machine: Mapping[str, Any]) -> str:
    """``this CPU (AMD EPYC, 2 cores)`` or ``this GPU (NVIDIA A10G)``, for the
    recommendation's sentences (notebook 06)."""
    if machine.get("gpu_usable") and machine.get("gpus"):
        return f"this GPU ({machine['gpus'][0]['name']})"
    return f"this CPU ({machine.get('cpu_model')}, {machine.get('usable_cpus')} cores)"


def machine_slug(machine: Mapping[str, Any]) -> str:
    """A folder name for this kind of machine: ``cpu-2core``, ``gpu-nvidia-a10`` (notebook 06)."""
    import re

    if machine.get("gpu_usable") and machine.get("gpus"):
        name = re.sub(r"[^a-z0-9]+", "-", str(machine["gpus"][0]["name"]).lower()).strip("-")
        return f"gpu-{name}"
    return f"cpu-{machine.get('usable_cpus') or os.cpu_count()}core"


def default_out_dir(machine: Mapping[str, Any]) -> Path:
    """``docs/results/<machine slug>`` in the course checkout, else in the course cache.
    Used by notebook 06_which_backend."""
    root = paths.repo_root()
    base = root / "docs" / "results" if root else paths.cache_dir() / "results" / "compare"
    return base / machine_slug(machine)


# --------------------------------------------------------------------------- running


def heldout_ids(model_dir: str | os.PathLike[str], settings: bk.Settings) -> list[int]:
    """The held-out text of notebook 02 as token ids of the model's tokenizer (the same ids
    go to every backend)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(quant.heldout_text(settings.eval_topics))["input_ids"]
    return [int(i) for i in ids[: settings.eval_tokens]]


def _worker_env(backend: bk.Backend, settings: bk.Settings) -> dict[str, str]:
    here = str(Path(__file__).resolve().parent.parent)  # labhelpers importable in any venv
    extra = {
        "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p),
        "PYTHONUNBUFFERED": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    if backend.runner == "ipex":
        # FINDINGS: with 2 threads ipex-llm collapses when the machine is shared
        extra["OMP_NUM_THREADS"] = str(settings.threads)
    return {**os.environ, **extra}


def run_worker(
    backend: bk.Backend,
    model_dir: str | os.PathLike[str],
    settings: bk.Settings,
    eval_ids: Sequence[int],
    *,
    log: Log = print,
) -> dict[str, Any]:
    """Measure an in-process backend in a fresh process (its own environment for
    IPEX-LLM): its progress lines are shown, its other output goes to a log file (notebook 06)."""
    python = sys.executable if backend.runner == "worker" else bk.env_python(bk.IPEX_KERNEL, "ipex")
    if python is None:
        raise WorkerError(f"no interpreter for {backend.name}: {bk.SETUP_HINT}")
    log_path = paths.cache_dir() / "logs" / "compare" / f"{backend.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(
            json.dumps(
                {
                    "backend": backend.name,
                    "model_dir": str(model_dir),
                    "settings": settings.as_dict(),
                    "eval_ids": list(eval_ids),
                }
            )
        )
        log(f"  worker: {Path(python).parent.parent.name} python, log {log_path}")
        with open(log_path, "w") as err:
            proc = subprocess.Popen(
                [python, "-m", "labhelpers.compare", "--worker", str(job)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=tmp,
                env=_worker_env(backend, settings),
                start_new_session=True,
            )
            timer = threading.Timer(settings.backend_timeout_s, _kill_group, (proc.pid,))
            timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log(line.rstrip())
                code = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:  # interrupted: leave no worker behind
                    _kill_group(proc.pid)
                    proc.wait()
        result = Path(tmp) / "row.json"
        if code != 0 or not result.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise WorkerError(f"worker exited with code {code}; end of {log_path}:\n{tail}")
        return json.loads(result.read_text())


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def worker_main(job_path: str, log: Log = print) -> int:
    """Entry point of ``--worker JOB``: measure one in-process backend, write ``row.json``
    next to the job file. Progress lines go to ``log`` (notebook 06)."""
    job = json.loads(Path(job_path).read_text())
    backend = bk.BACKENDS[job["backend"]]
    settings = bk.Settings.from_dict(job["settings"])
    try:
        row = measurement.measure_in_process(
            backend, job["model_dir"], settings, job["eval_ids"], log=log
        )
    except Exception:
        traceback.print_exc()
        return 1
    (Path(job_path).parent / "row.json").write_text(json.dumps(_clean(row)))
    return 0


def _progress_channel() -> Log:
    """In a worker: keep stdout for the progress lines the parent shows, and send what the
    libraries print there (banners, warnings) to stderr, the worker's log file."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return lambda line: print(line, file=channel, flush=True)


def skipped_row(backend: bk.Backend, reason: str, status: str = "skipped") -> dict[str, Any]:
    """The row of a backend that did not run: every measurement empty, the reason given.
    Used by notebook 06_which_backend."""
    row = {c: None for c in COLUMNS}
    row.update(backend=backend.name, engine=backend.engine, weights=backend.weights)
    row.update(status=status, skipped_reason=reason)
    return row


def run(
    backends: str | Sequence[str] | None = None,
    settings: bk.Settings | None = None,
    *,
    log: Log = print,
    machine: Mapping[str, Any] | None = None,
) -> Comparison:
    """Measure ``backends`` (default: all) one after the other, one server at a time
    (notebook 06 and the command line). Never raises for a backend that cannot run or
    fails: its row says why."""
    settings = settings or bk.Settings()
    chosen = bk.get_backends(backends)
    machine = dict(machine or describe_machine(settings.threads))
    gpus = ", ".join(g["name"] for g in machine["gpus"]) or "none"
    log(
        f"machine: {machine['cpu_model']}, {machine['usable_cpus']} CPU(s), GPU: {gpus}; memory "
        f"bandwidth {machine['cpu_bandwidth_gbps']:.1f} GB/s with "
        f"{machine['cpu_bandwidth_threads']} thread(s)"
    )
    base_dir = models.resolve(settings.model, log=log)
    gptq_dir = None
    if any(b.gptq_checkpoint for b in chosen):
        gptq_dir = models.resolve(settings.gptq_name, log=log)
    eval_ids = heldout_ids(base_dir, settings)
    log(f"held-out text: {len(eval_ids)} tokens (topics {', '.join(settings.eval_topics)})")
    rows = []
    for backend in chosen:
        t0 = time.monotonic()
        log(f"\n▶ {backend.name}")
        reason = bk.skip_reason(backend)
        if reason:
            log(f"  ⏭  SKIPPED: {reason}")
            rows.append(skipped_row(backend, reason))
            continue
        model_dir = str(gptq_dir if backend.gptq_checkpoint else base_dir)
        try:
            if backend.runner == "server":
                row = measurement.measure_server(backend, model_dir, settings, eval_ids, log=log)
            else:
                row = run_worker(backend, model_dir, settings, eval_ids, log=log)
        except Exception as exc:  # one broken backend must not stop the comparison
            message = f"failed: {type(exc).__name__}: {exc}"
            log(f"  ✗ {message}")
            row = skipped_row(backend, message[:2000], status="failed")
        rows.append(row)
        log(f"  ({time.monotonic() - t0:.0f} s)")
    finish_rows(rows, machine)
    if hasattr(os, "getloadavg"):  # a busy machine makes every timing noisier
        machine["load_average_at_end"] = list(os.getloadavg())
    return Comparison(rows=rows, machine=machine, settings=settings)


def finish_rows(rows: list[dict[str, Any]], machine: Mapping[str, Any]) -> None:
    """Derived columns, in place: perplexity of a server from its twin with the same
    weights (when the server could not score text), roofline and its percentage, the top
    concurrency level, the perplexity increase over the reference (notebook 06)."""
    by_name = {r["backend"]: r for r in rows}
    for row in rows:
        if row.get("status") != "measured":
            continue
        twin = by_name.get(bk.BACKENDS[row["backend"]].twin or "")
        if number(row.get("perplexity")) is None and twin and number(twin.get("perplexity")):
            row["perplexity"] = twin["perplexity"]
            row["perplexity_source"] = f"from {twin['backend']} (same weights)"
        on_gpu = row.get("threads") == "GPU"
        bandwidth = (
            machine.get("gpu_bandwidth_gbps") if on_gpu else machine.get("cpu_bandwidth_gbps")
        )
        decode = number(row.get("decode_tok_s"))
        if bandwidth and decode and row.get("weight_bytes") and row.get("kv"):
            context = int((row.get("prompt_tokens") or 0) + (row.get("new_tokens") or 0) / 2)
            per_token = bench.decode_bytes_per_token(
                int(row["weight_bytes"]),
                context_tokens=context,
                kv_bytes_per_elem=row.get("kv_bytes_per_elem") or 2,
                **row["kv"],
            )
            row["roofline_tok_s"] = bench.roofline_tokens_per_s(bandwidth * bench.GB, per_token)
            row["pct_of_roofline"] = bench.percent_of_roofline(decode, row["roofline_tok_s"])
        levels = [lvl for lvl in row.get("sweep") or [] if number(lvl.get("aggregate_tok_s"))]
        if levels:
            top = max(levels, key=lambda lvl: lvl["concurrency"])
            row["aggregate_tok_s"], row["at_concurrency"] = (
                top["aggregate_tok_s"],
                top["concurrency"],
            )
    ref = verdict.reference(rows)
    for row in rows:
        ppl = number(row.get("perplexity"))
        if ref and ppl:
            row["ppl_increase_pct"] = 100.0 * (ppl / ref["perplexity"] - 1.0)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[bk.Settings, argparse.Namespace]:
    """The command line as (settings, the other options) (notebook 06)."""
    d = bk.Settings()
    p = argparse.ArgumentParser(
        prog="python -m labhelpers.compare",
        description="Measure every way of running one model on this machine (notebook 06).",
    )
    p.add_argument("--backends", default="all", help=f"comma-separated: {', '.join(bk.BACKENDS)}")
    p.add_argument("--model", default=d.model, help="models.json name, hub id or folder")
    p.add_argument(
        "--gptq-model", default=None, help="GPTQ checkpoint (default: <model>-GPTQ-Int4)"
    )
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per prompt")
    p.add_argument("--concurrency", default=",".join(map(str, d.concurrency)))
    p.add_argument("--requests-per-slot", type=int, default=d.requests_per_slot)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--eval-window", type=int, default=d.eval_window)
    p.add_argument("--eval-stride", type=int, default=d.eval_stride)
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads, single stream")
    p.add_argument("--max-ppl-increase", type=float, default=0.5, help="0.5 = +50%% perplexity")
    p.add_argument("--out-dir", default=None, help="default: docs/results/<machine>")
    p.add_argument("--list", action="store_true", help="list the backends and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        concurrency = tuple(int(c) for c in str(args.concurrency).split(",") if c.strip())
        settings = bk.Settings(
            model=args.model,
            gptq_model=args.gptq_model,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            concurrency=concurrency,
            requests_per_slot=args.requests_per_slot,
            eval_tokens=args.eval_tokens,
            eval_window=args.eval_window,
            eval_stride=args.eval_stride,
            threads=args.threads,
        )
        if args.backends != "all":
            bk.get_backends(args.backends)
    except ValueError as exc:
        p.error(str(exc))
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labhelpers.compare``: run, print the table and the recommendation,
    write the files. Exit code 1 only when no backend could be measured (notebook 06)."""
    settings, args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, log=_progress_channel())
    if args.list:
        for backend in bk.get_backends(args.backends):
            print(f"{backend.name:24} {bk.skip_reason(backend) or 'can run here'}")
        return 0
    result = run(args.backends, settings)
    result.max_ppl_increase = args.max_ppl_increase
    words = ["python", "-m", "labhelpers.compare", *(sys.argv[1:] if argv is None else argv)]
    result.command = shlex.join(words)
    out = Path(args.out_dir) if args.out_dir else default_out_dir(result.machine)
    files = result.write(out)
    table = result.table().set_index("backend")
    shown = ["status", "load_s", "ttft_s", "decode_tok_s", "pct_of_roofline", "aggregate_tok_s",
             "peak_mem_gb", "disk_gb", "perplexity"]  # fmt: skip
    print("\n" + table[shown].round(3).to_string())
    print("\n" + result.recommendation())
    for name, path in files.items():
        print(f"wrote {name}: {path}")
    return 0 if any(r.get("status") == "measured" for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
