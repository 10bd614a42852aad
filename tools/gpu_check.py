"""GPU smoke check: the course's GPU path end to end in a few minutes, with no network.

    python tools/gpu_check.py              # a GPU machine: every step; no CUDA: a dry run
    python tools/gpu_check.py --dry-run    # the dry run, even where a GPU is visible
    ./course gpu-check                     # the same with the core environment's Python

Steps (each timed; a failed step says why, later steps that need it are skipped):

1. environment: torch and its CUDA, the GPU, the NVIDIA driver (nvidia-smi), the nvcc torch's
   extension builder would use (GPTQModel compiles its Marlin kernels with it at the first GPU
   load), transformers, GPTQModel;
2. a tokenizer made offline: the course's stand-in tokenizer when it is built, else a
   byte-level one constructed here (256 bytes + ChatML tokens);
3. a tiny random Qwen2 model built from a config (hidden 512, 4 layers, intermediate 1536:
   every linear width a multiple of 128, as the GPU int4 kernels need);
4. its size by ``labhelpers.sizing`` (weights in GPTQ int4 g128, KV cache, activations);
5. GPTQModel quantization (4-bit, group 128, sym, no act-order) on the GPU;
6. reload through transformers (``AutoModelForCausalLM.from_pretrained``) and the class of
   the int4 layer that loaded: Marlin (or Machete on Hopper) expected on compute capability 8.0+;
7. greedy generation, and ``torch.cuda.max_memory_allocated`` against the sizing estimate;
8. notebook 01's GPU measurement: ``measure.PeakMemory`` with CUDA, ``measure.time_generate``,
   and the roofline from the GPU's own measured bandwidth (``roofline.memory_bandwidth_gbps
   ("cuda")``): a result above 100 % of it means the bandwidth is not the GPU's.

Without CUDA every CUDA step prints SKIPPED with the reason, and steps 5-8 run on the CPU
instead (the dry run: every non-CUDA part of the same code). Nothing is downloaded
(HF_HUB_OFFLINE=1). Needs torch, transformers and gptqmodel; labhelpers is imported from this
checkout, so any Python with those three works (a cloud image without the course's
environments); where labhelpers cannot be imported, the steps that need it are skipped and the
raw numbers are still printed. Ends with a Markdown table to paste into an issue (``--markdown
FILE`` writes it, ``--json FILE`` the same as data); exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "labhelpers" / "__init__.py").is_file() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's labhelpers, installed or not

# The tiny model: every linear layer's input and output widths are multiples of 128 (Marlin
# needs in % 128 == 0, Machete out % 128 == 0); 8 heads of 64, 2 KV heads (GQA, as in Qwen2.5).
TINY = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
BITS, GROUP_SIZE = 4, 128
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FAST_INT4 = ("Marlin", "Machete", "Swordfish", "ExllamaV2")  # GPTQModel's CUDA int4 kernels
PROMPT = "Explain in two sentences what model quantization is."


class CheckFailed(RuntimeError):
    """A step ran but its result is wrong; the message says what was expected."""


@dataclass
class Step:
    name: str
    device: str
    status: str  # ok | failed | skipped
    seconds: float | None = None
    numbers: str = ""
    detail: str = ""


class Report:
    """Runs the steps, prints one progress line each, keeps library output in a log."""

    def __init__(self, log_path: Path, timeout_s: float | None = None) -> None:
        self.steps: list[Step] = []
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def skip(self, name: str, device: str, reason: str) -> Step:
        return self._add(Step(name, device, "skipped", detail=reason))

    def run(
        self, name: str, device: str, fn: Callable[[], str], *, needs: tuple[Step, ...] = ()
    ) -> Step:
        """Run ``fn`` (it returns the key numbers as text) unless a step it needs is not ok."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            return self.skip(name, device, f"the check ran past --timeout {self.timeout_s:.0f} s")
        for dep in needs:
            if dep.status != "ok":
                return self.skip(
                    name, device, f"needs '{dep.name}' ({dep.device}), which {dep.status}"
                )
        print(f"… {name} ({device})", flush=True)
        t0 = time.perf_counter()
        try:
            with to_log(self.log_path, name):
                numbers = fn()
        except Exception as exc:  # any failure is a finding: report it, go on with the rest
            with open(self.log_path, "a") as log:
                traceback.print_exc(file=log)
            detail = f"{type(exc).__name__}: {exc}".strip()
            return self._add(Step(name, device, "failed", time.perf_counter() - t0, detail=detail))
        return self._add(Step(name, device, "ok", time.perf_counter() - t0, numbers))

    def _add(self, step: Step) -> Step:
        self.steps.append(step)
        took = f" in {step.seconds:.1f} s" if step.seconds is not None else ""
        mark = {"ok": "✓ ok", "failed": "✗ FAILED", "skipped": "⏭  SKIPPED"}[step.status]
        text = step.numbers or step.detail
        if len(text) > 1500:  # a compiler's error, say: the whole of it is in the log
            text = f"{text[:1500]} … (the rest in {self.log_path})"
        print(f"{mark}: {step.name} ({step.device}){took}. {text}", flush=True)
        return step

    def markdown(self, title: str) -> str:
        rows = [
            f"### {title}",
            "",
            "| # | step | device | status | s | key numbers / reason |",
            "|---|---|---|---|---|---|",
        ]
        for i, s in enumerate(self.steps, 1):
            text = s.numbers if s.status == "ok" else s.detail
            text = re.sub(r"\s+", " ", text).replace("|", "\\|")
            secs = f"{s.seconds:.1f}" if s.seconds is not None else "–"
            status = {"ok": "ok", "failed": "**FAILED**", "skipped": "SKIPPED"}[s.status]
            rows.append(f"| {i} | {s.name} | {s.device} | {status} | {secs} | {text[:600]} |")
        counts = {k: sum(s.status == k for s in self.steps) for k in ("ok", "failed", "skipped")}
        total = sum(s.seconds or 0 for s in self.steps)
        rows += [
            "",
            f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
            f"{total:.0f} s of steps. Library output: `{self.log_path}`",
        ]
        return "\n".join(rows)


@contextlib.contextmanager
def to_log(path: Path, what: str) -> Iterator[None]:
    """Send file descriptors 1 and 2 (C extensions, compilers) and Python's sys.stdout and
    sys.stderr to ``path``. Python's streams go through writers on fds 1 and 2 that are never
    closed: a logging handler a library creates inside the block writes to wherever those fds
    point later (the terminal, or the next step's log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved, streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    with open(path, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"\n===== {what} =====\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({type(exc).__name__})"
    return done.stdout + done.stderr


def driver_and_nvcc() -> dict[str, str | None]:
    """nvidia-smi's driver and CUDA version; the nvcc torch's cpp_extension would use."""
    out: dict[str, str | None] = {"driver": None, "driver_cuda": None, "nvcc": None}
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = run_text(query).strip().splitlines()
        out["driver"] = driver[0].strip() if driver and driver[0][:1].isdigit() else None
        found = re.search(r"CUDA Version:\s*([0-9.]+)", run_text(["nvidia-smi"]))
        out["driver_cuda"] = found.group(1) if found else None
    from torch.utils.cpp_extension import CUDA_HOME  # what GPTQModel's JIT build uses

    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc and nvcc.exists():
        found = re.search(r"release ([0-9.]+)", run_text([str(nvcc), "--version"]))
        out["nvcc"] = f"{found.group(1) if found else '?'} ({nvcc})"
    return out


def minimal_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges (every byte is a token) plus ChatML's
    special tokens, built in memory: no file, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def standin_tokenizer_dir() -> Path:
    cache = os.environ.get("QWEN_LAB_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "qwen-deploy-lab"
    return (Path(cache).expanduser() if cache else base) / "models" / "standin"


def calibration_texts(n: int = 32) -> list[str]:
    """Calibration text shipped with Python (its language reference, ``pydoc_data``)."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n")]
    return [p for p in paragraphs if len(p) > 400][:n]


def load_labhelpers(disabled: bool) -> tuple[Any, str]:
    """(namespace of labhelpers modules or None, where they came from or why not)."""
    if disabled:
        return None, "not used (--without-labhelpers)"
    try:
        import labhelpers
        from labhelpers import measure, models, roofline, sizing
    except Exception as exc:  # not in this checkout, or a dependency missing
        return None, f"not importable ({type(exc).__name__}: {exc})"
    ns = argparse.Namespace(measure=measure, models=models, roofline=roofline, sizing=sizing)
    return ns, str(Path(labhelpers.__file__).parent)


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/gpu_check.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU only, even where a GPU is visible"
    )
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="auto (the stand-in's if built, else minimal), minimal, or a folder",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--timeout",
        type=float,
        default=480,
        help="seconds for the whole check (default 480); a step still running then fails, "
        "the steps after it are skipped",
    )
    parser.add_argument(
        "--work-dir", help="where the models go (default: a temporary folder, removed)"
    )
    parser.add_argument("--markdown", help="also write the report table to this file")
    parser.add_argument("--json", help="also write the steps as JSON to this file")
    parser.add_argument(
        "--without-labhelpers",
        action="store_true",
        help="behave as where labhelpers cannot be imported (raw numbers only)",
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="qwen-lab-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"qwen-lab-gpu-check-{os.getpid()}.log"
    report = Report(log_path, args.timeout)
    if hasattr(signal, "SIGALRM"):  # interrupt a step that hangs (a compiler, a kernel load)

        def out_of_time(signum: int, frame: Any) -> None:
            raise TimeoutError(f"the check ran past --timeout {args.timeout:.0f} s")

        signal.signal(signal.SIGALRM, out_of_time)
        signal.alarm(max(1, int(args.timeout)))
    lab, lab_where = load_labhelpers(args.without_labhelpers)
    s: dict[str, Any] = {}  # what the steps hand on to later steps

    # 1. environment --------------------------------------------------------------------------
    def environment() -> str:
        import torch

        s["cuda"] = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if s["cuda"]:
            cap = torch.cuda.get_device_capability(0)
            s["gpu"], s["capability"] = torch.cuda.get_device_name(0), cap
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
            gpu = f"{s['gpu']} (sm_{cap[0]}{cap[1]}, {memory:.0f} GiB)"
        elif args.dry_run:
            s["why_no_cuda"] = "dry run (--dry-run)"
            gpu = "none used: --dry-run"
        else:
            s["why_no_cuda"] = (
                f"torch {torch.__version__} is a CPU-only build"
                if torch.version.cuda is None
                else f"torch.cuda.is_available() is False (torch for CUDA {torch.version.cuda})"
            )
            gpu = f"none usable: {s['why_no_cuda']}"
        tools = driver_and_nvcc()
        s["nvcc"] = tools["nvcc"]
        parts = [
            f"torch {torch.__version__} (CUDA {torch.version.cuda})",
            f"GPU {gpu}",
            f"driver {tools['driver'] or '–'} (CUDA {tools['driver_cuda'] or '–'})",
            f"nvcc {tools['nvcc'] or 'not found'}",
        ]
        if s["cuda"] and tools["nvcc"] and torch.version.cuda:
            if tools["nvcc"].split(".")[0] != torch.version.cuda.split(".")[0]:
                parts.append("nvcc and torch differ in CUDA major: the Marlin JIT build will fail")
        for pkg in ("transformers", "gptqmodel", "optimum", "accelerate"):
            parts.append(f"{pkg} {package_version(pkg) or 'MISSING'}")
        parts.append(f"labhelpers {lab_where}")
        parts.append(f"Python {platform.python_version()}")
        import transformers  # noqa: F401  (fails the step when missing)

        return "; ".join(parts)

    env = report.run("environment", "-", environment)
    cuda = bool(s.get("cuda"))
    no_cuda = s.get("why_no_cuda") or f"the environment step {env.status}: {env.detail}"

    # 2. tokenizer ----------------------------------------------------------------------------
    def tokenizer() -> str:
        from transformers import AutoTokenizer

        folder = standin_tokenizer_dir() if args.tokenizer == "auto" else Path(args.tokenizer)
        if args.tokenizer != "minimal" and (folder / "tokenizer.json").is_file():
            tok, source = AutoTokenizer.from_pretrained(folder), f"from {folder}"
            if not tok.chat_template:
                tok.chat_template = CHATML_TEMPLATE
        elif args.tokenizer not in ("auto", "minimal"):
            raise CheckFailed(f"{folder} has no tokenizer.json")
        else:
            tok, source = minimal_tokenizer(), "byte-level, built here (stand-in not built)"
            if args.tokenizer == "minimal":
                source = "byte-level, built here (--tokenizer minimal)"
        text = tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        if tok.decode(tok(text)["input_ids"]) != text:
            raise CheckFailed("the tokenizer does not round-trip a ChatML prompt")
        s["tok"] = tok
        return f"{len(tok)} tokens, {source}; ChatML round-trips"

    tok_step = report.run("tokenizer (offline)", "-", tokenizer, needs=(env,))

    # 3. tiny model ---------------------------------------------------------------------------
    def build() -> str:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = s["tok"]
        vocab = -(-len(tok) // 128) * 128  # padded to a multiple of 128, as Qwen's vocabularies are
        config = Qwen2Config(
            vocab_size=vocab,
            tie_word_embeddings=False,
            **TINY,
            bos_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
        model.generation_config.pad_token_id = tok.pad_token_id
        s["base"] = work / "tiny-qwen2"
        model.save_pretrained(s["base"])
        tok.save_pretrained(s["base"])
        s["config"] = config.to_dict()
        params = sum(p.numel() for p in model.parameters())
        return (
            f"Qwen2ForCausalLM, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{config.num_attention_heads}/{config.num_key_value_heads} heads, vocab {vocab}: "
            f"{params / 1e6:.1f} M params, bf16 {params * 2 / 1e6:.1f} MB"
        )

    built = report.run("build tiny Qwen2 from a config", "cpu", build, needs=(tok_step,))

    # 4. sizing -------------------------------------------------------------------------------
    prompt_len = 0
    if tok_step.status == "ok":
        chat = s["tok"].apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        prompt_len = len(s["tok"](chat)["input_ids"])

    def sizing_step() -> str:
        est = lab.sizing.estimate(
            s["config"],
            "int4_gptq",
            group_size=GROUP_SIZE,
            batch=1,
            context=prompt_len + args.max_new_tokens,
            max_num_tokens=prompt_len,
            name="tiny-qwen2",
        )
        shape = lab.sizing.shape_of(s["config"], name="tiny-qwen2")
        s["est"] = est
        s["est_checkpoint"] = lab.sizing.weight_bytes(
            shape, lab.sizing.get_mode("int4_gptq", GROUP_SIZE), layout="checkpoint"
        )
        s["est_runtime"] = est.weight_bytes + est.kv_bytes + est.activation_bytes
        return (
            f"int4_gptq g{GROUP_SIZE}, {prompt_len}+{args.max_new_tokens} tokens: "
            f"weights {gib(est.weight_bytes)} (checkpoint layout {gib(s['est_checkpoint'])}), "
            f"KV {gib(est.kv_bytes)}, activations {gib(est.activation_bytes)}; "
            f"runtime without the 1 GiB reserve {gib(s['est_runtime'])}"
        )

    if lab is None:
        report.skip("sizing estimate (labhelpers.sizing)", "-", f"labhelpers {lab_where}")
    else:
        report.run("sizing estimate (labhelpers.sizing)", "-", sizing_step, needs=(built,))

    # 5-8 on a device -------------------------------------------------------------------------
    def quantize(dev: str) -> Callable[[], str]:
        def step() -> str:
            import torch
            from gptqmodel import GPTQModel, QuantizeConfig

            tok = s["tok"]
            calib = []
            samples, length = (32, 256) if dev == "cuda" else (16, 128)  # the dry run: quicker
            for text in calibration_texts(samples):
                chat = tok.apply_chat_template(
                    [
                        {"role": "user", "content": "Summarize:"},
                        {"role": "assistant", "content": text},
                    ],
                    tokenize=False,
                )
                ids = tok(chat, truncation=True, max_length=length)["input_ids"]
                calib.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
            dtype = torch.float16 if dev == "cuda" and s["capability"] < (8, 0) else torch.bfloat16
            qcfg = QuantizeConfig(
                bits=BITS, group_size=GROUP_SIZE, desc_act=False, sym=True, device=dev
            )
            cwd = os.getcwd()
            os.chdir(work)  # GPTQModel writes ./logs
            try:
                model = GPTQModel.load(str(s["base"]), qcfg, dtype=dtype)
                model.quantize(calib, batch_size=4)
                s["quant"] = work / f"tiny-qwen2-gptq-int4-{dev}"
                model.save(str(s["quant"]))
                tok.save_pretrained(s["quant"])
            finally:
                os.chdir(cwd)
            del model
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
            qcfg_saved = json.loads((s["quant"] / "config.json").read_text())["quantization_config"]
            size_mb = sum(f.stat().st_size for f in s["quant"].glob("*.safetensors")) / 1e6
            return (
                f"{len(calib)} calibration samples, {qcfg_saved.get('quant_method')} "
                f"{qcfg_saved.get('bits')}-bit g{qcfg_saved.get('group_size')}, {dtype}; "
                f"checkpoint {size_mb:.1f} MB"
            )

        return step

    def reload(dev: str) -> Callable[[], str]:
        def step() -> str:
            import torch
            from transformers import AutoModelForCausalLM

            if dev == "cuda":  # what the model needs: the peak above what is held already
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                s["held"] = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    s["quant"], device_map=dev, dtype="auto"
                )
            except Exception as exc:
                if dev != "cuda":
                    raise
                raise CheckFailed(
                    f"{type(exc).__name__}: {exc} -- on a GPU, GPTQModel compiles its Marlin "
                    f"kernels at this first load with nvcc ({s['nvcc'] or 'none found'}; torch is "
                    f"built for CUDA {torch.version.cuda}): ./course check says what to fix"
                ) from exc
            load_s = time.perf_counter() - t0
            layer = type(model.model.layers[0].self_attn.q_proj)
            s["model"], s["kernel"] = model, layer.__name__
            text = (
                f"q_proj is {layer.__module__}.{layer.__name__}; {model.dtype}; load {load_s:.1f} s"
            )
            if (
                dev == "cuda"
                and s["capability"] >= (8, 0)
                and not any(k in layer.__name__ for k in FAST_INT4)
            ):
                raise CheckFailed(
                    f"{text}: expected a CUDA int4 kernel ({', '.join(FAST_INT4)}) on "
                    f"compute capability {s['capability'][0]}.{s['capability'][1]}"
                )
            return text

        return step

    def generate(dev: str) -> Callable[[], str]:
        def step() -> str:
            import torch

            model, tok = s["model"], s["tok"]
            inputs = tok.apply_chat_template(
                [{"role": "user", "content": PROMPT}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
            n = args.max_new_tokens
            model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            if dev == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            new = out.shape[1] - inputs["input_ids"].shape[1]
            if new != n:
                raise CheckFailed(f"generated {new} tokens, asked for exactly {n}")
            weights = sum(
                t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
            )
            text = f"{new} new tokens in {secs:.2f} s ({new / secs:.0f} tokens/s, random weights)"
            text += f"; weights {gib(weights)}"
            if "est_checkpoint" in s:  # the sizing estimate of the same layers
                text += f" = {weights / s['est_checkpoint']:.2f}x the sizing estimate"
            if dev == "cuda":
                peak = torch.cuda.max_memory_allocated() - s["held"]
                text += f"; torch.cuda.max_memory_allocated {gib(peak)} (load + generate)"
                if "est_runtime" in s:
                    ratio = peak / s["est_runtime"]
                    text += f" = {ratio:.2f}x the estimate {gib(s['est_runtime'])}"
            if "est_checkpoint" in s and not 0.5 <= weights / s["est_checkpoint"] <= 2.0:
                raise CheckFailed(f"{text}: the loaded weights are far from the sizing estimate")
            return text

        return step

    def notebook01(dev: str) -> Callable[[], str]:
        def step() -> str:
            import torch

            model, tok = s["model"], s["tok"]
            inputs = tok.apply_chat_template(
                [{"role": "user", "content": PROMPT}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            batch = {k: v.to(model.device) for k, v in inputs.items()}
            n = args.max_new_tokens
            with lab.measure.PeakMemory() as mem:
                run = lab.measure.time_generate(
                    lambda streamer: model.generate(
                        **batch,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        streamer=streamer,
                    ),
                    label="tiny GPTQ",
                    warmup=1,
                    repeats=3,
                )
            row = run.as_row()
            if dev == "cuda" and (mem.peak_cuda_bytes is None or row["peak_cuda_gb"] is None):
                raise CheckFailed("measure.PeakMemory recorded no CUDA peak on a GPU")
            bw = lab.roofline.memory_bandwidth_gbps(
                dev, threads=None if dev == "cuda" else torch.get_num_threads()
            )
            per_token = lab.roofline.bytes_per_token(
                model, context_tokens=batch["input_ids"].shape[1] + n // 2
            )
            roof = lab.roofline.roofline_tokens_per_s(bw.read_gbps, per_token)
            pct = lab.roofline.percent_of_roofline(row["decode_tokens_per_s"], roof)
            text = (
                f"TTFT {row['ttft_s'] * 1e3:.1f} ms, decode {row['decode_tokens_per_s']:.0f} "
                f"tokens/s (median of 3); {bw.device} bandwidth {bw.read_gbps:.0f} GB/s measured"
                + (f" (datasheet {bw.datasheet_gbps:.0f})" if bw.datasheet_gbps else "")
                + f"; {per_token / 1e6:.1f} MB per token -> roofline {roof:.0f} tokens/s, "
                f"{pct:.1f} % of it"
            )
            if dev == "cuda":
                text += f"; PeakMemory CUDA peak {row['peak_cuda_gb']:.3f} GB"
                if pct > 100:
                    raise CheckFailed(
                        f"{text}: above 100 % of the roofline: the bandwidth is not the GPU's"
                    )
                if bw.datasheet_gbps and bw.read_gbps > 1.1 * bw.datasheet_gbps:
                    raise CheckFailed(f"{text}: measured bandwidth above the datasheet's")
            else:
                text += f"; PeakMemory RSS peak {row['peak_rss_gb']:.2f} GB"
            return text

        return step

    devices = ["cuda"] if cuda else ["cuda", "cpu"]
    for dev in devices:
        tag = dev if dev == "cuda" else "cpu (dry run)"
        if dev == "cuda" and not cuda:
            for name in (
                "GPTQ quantize (GPTQModel)",
                "reload via transformers: int4 kernel class",
                "generate; max_memory_allocated vs sizing",
                "notebook 01 measurement (GPU branch)",
            ):
                report.skip(name, "cuda", f"no CUDA here: {no_cuda}")
            continue
        q = report.run("GPTQ quantize (GPTQModel)", tag, quantize(dev), needs=(built,))
        r = report.run("reload via transformers: int4 kernel class", tag, reload(dev), needs=(q,))
        what = "generate; max_memory_allocated vs sizing" if dev == "cuda" else "generate"
        report.run(what, tag, generate(dev), needs=(r,))
        nb01 = f"notebook 01 measurement ({'GPU' if dev == 'cuda' else 'CPU'} branch)"
        if lab is None:
            report.skip(nb01, tag, f"needs labhelpers.measure/roofline, {lab_where}")
        else:
            report.run(nb01, tag, notebook01(dev), needs=(r,))
        s.pop("model", None)

    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = f"GPU run on {s.get('gpu')}" if cuda else f"dry run on the CPU ({no_cuda})"
    text = report.markdown(f"qwen-deploy-lab GPU smoke check · {when} · {mode}")
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": when,
                    "cuda": cuda,
                    "mode": mode,
                    "steps": [asdict(x) for x in report.steps],
                },
                indent=2,
            )
            + "\n"
        )
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(x.status == "failed" for x in report.steps) else 0


if __name__ == "__main__":
    sys.exit(main())
