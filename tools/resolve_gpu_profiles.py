"""Resolve each GPU profile's pins from PyPI metadata and write requirements/gpu-profiles.lock.json.

Run by hand when a ``requirements/core-gpu*.txt`` file changes (tests/test_setup_profiles.py fails
until the lock matches the requirement files again)::

    .venvs/core/bin/python tools/resolve_gpu_profiles.py          # all GPU profiles, ~3 min
    .venvs/core/bin/python tools/resolve_gpu_profiles.py --check  # compare only, write nothing

It asks pip (>= 24, which reads wheel metadata from the index without downloading wheels) what
``pip install -r requirements/core-<profile>.txt`` would install on Linux x86_64 with CPython 3.11,
the course's classroom machines, whatever machine it runs on:

    pip install --dry-run --ignore-installed --report R --only-binary=:all:
        --platform manylinux_2_35_x86_64 ... --python-version 3.11 --target T -r REQ

The machine's pip configuration is ignored (``PIP_CONFIG_FILE=/dev/null``; no local find-links,
constraints or extra indexes such as PyTorch's CPU index); ``PIP_INDEX_URL`` is kept, so a PyPI
mirror works. A few requirements exist only as source distributions (gptqmodel, and some of its
small dependencies): pip cannot read their metadata without building them, so this script builds
their wheels (``pip wheel --no-deps``, seconds, pure Python or a small C extension) into a cache
folder and offers them to the resolver with ``--find-links``. It must therefore run on Linux
x86_64 with CPython 3.11.

The lock records, per profile, the requirement file's SHA-256, the versions of the main packages,
what vLLM and GPTQModel require of torch/transformers/numpy, the CUDA runtime torch is built on
(and so the CUDA major, which the profile's driver threshold in ``./course`` must match), and
every nvidia-*/cuda-* package pip would install. It is a record of a resolution on one date:
versions of unpinned dependencies may move later.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
LOCK = REQUIREMENTS / "gpu-profiles.lock.json"
PYTHON_VERSION = "3.11"
# Ubuntu 20.04 has glibc 2.31, 22.04 2.35: every manylinux tag a classroom machine accepts.
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(35, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
KEY_PACKAGES = [
    "torch",
    "vllm",
    "transformers",
    "tokenizers",
    "numpy",
    "triton",
    "gptqmodel",
    "optimum",
    "accelerate",
    "huggingface-hub",
    "safetensors",
    "openai",
    "torchvision",
    "torchaudio",
    "torchao",
    "flashinfer-python",
    "compressed-tensors",
    "xgrammar",
]
REQUIRES_OF = {
    "vllm": ("torch", "transformers", "numpy"),
    "gptqmodel": ("torch", "transformers", "numpy"),
}
NO_DIST = re.compile(r"No matching distribution found for ([^\s(]+)")
# pip's environment settings that would make the answer depend on this machine
MACHINE_PIP_SETTINGS = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MACHINE_PIP_SETTINGS}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip(*args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        env=pip_env(),
        capture_output=capture,
        text=True,
        check=False,
    )


def check_interpreter() -> str:
    import pip as pip_module

    version = pip_module.__version__
    if int(version.split(".")[0]) < 24:
        sys.exit(f"pip {version} downloads whole wheels to read metadata: run with pip >= 24")
    here = (platform.system(), platform.machine(), "{}.{}".format(*sys.version_info[:2]))
    if here != ("Linux", "x86_64", PYTHON_VERSION):
        sys.exit(
            f"run on Linux x86_64 with CPython {PYTHON_VERSION} (source-only packages are "
            f"built here for that platform); this is {here}"
        )
    return version


def build_wheel(requirement: str, wheels: Path) -> None:
    """Build a source-only requirement's wheel into the find-links folder."""
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    print(f"    building a wheel for {requirement} (source distribution only)", flush=True)
    done = pip("wheel", "--no-deps", "--no-binary", name, "-w", str(wheels), requirement)
    if done.returncode != 0:
        sys.exit(f"could not build {requirement}:\n{done.stderr[-3000:]}")


def resolve(requirements: Path, wheels: Path) -> dict[str, Any]:
    """pip's installation report for requirements on the classroom platform."""
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    built: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        for _ in range(20):  # each round builds at most one missing source-only package
            done = pip(
                "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                "--only-binary=:all:", *platform_args, "--python-version", PYTHON_VERSION,
                "--implementation", "cp", "--target", str(Path(tmp) / "target"),
                "--find-links", str(wheels), "-r", str(requirements),
            )  # fmt: skip
            if done.returncode == 0:
                return json.loads(report.read_text(encoding="utf-8"))
            missing = NO_DIST.search(done.stderr)
            if not missing or missing[1] in built:
                sys.exit(f"pip could not resolve {requirements.name}:\n{done.stderr[-3000:]}")
            built.add(missing[1])
            build_wheel(missing[1], wheels)
    sys.exit(f"gave up resolving {requirements.name} after building {sorted(built)}")


def requirement_of(metadata: dict[str, Any], name: str) -> str | None:
    """The specifier a package's metadata puts on `name` (markers for py3.11/Linux kept as-is)."""
    for line in metadata.get("requires_dist") or []:
        if "extra ==" in line:
            continue
        head = line.split(";", 1)[0].strip()
        match = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)", head)
        if match and canonical(match[1]) == name:
            marker = line.split(";", 1)[1].strip() if ";" in line else ""
            if 'python_version >= "3.14"' in marker:
                continue
            return match[3].strip().strip("()") or "*"
    return None


def torch_cuda(metadata: dict[str, Any]) -> str:
    """The CUDA version torch's wheel is built on, from its requirements."""
    for line in metadata.get("requires_dist") or []:
        if "extra ==" in line:
            continue
        runtime = re.match(r"nvidia-cuda-runtime(?:-cu\d+)?\s*==\s*(\d+\.\d+)", line)
        toolkit = re.match(r"cuda-toolkit(?:\[[^\]]*\])?\s*==\s*(\d+\.\d+)", line)
        if runtime or toolkit:
            return (runtime or toolkit)[1]  # type: ignore[index]
    raise SystemExit("torch's metadata names no CUDA runtime: is this a CUDA build?")


def summarize(profile: str, requirements: Path, report: dict[str, Any]) -> dict[str, Any]:
    installs = {canonical(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    cuda = torch_cuda(installs["torch"])
    return {
        "requirements": requirements.relative_to(ROOT).as_posix(),
        "requirements_sha256": hashlib.sha256(requirements.read_bytes()).hexdigest(),
        "packages": len(installs),
        "torch_cuda": cuda,
        "cuda_major": int(cuda.split(".")[0]),
        "versions": {name: installs[name]["version"] for name in KEY_PACKAGES if name in installs},
        "requires": {
            pkg: {dep: requirement_of(installs[pkg], dep) for dep in deps}
            for pkg, deps in REQUIRES_OF.items()
            if pkg in installs
        },
        "cuda_packages": {
            name: meta["version"]
            for name, meta in sorted(installs.items())
            if name.startswith(("nvidia-", "cuda-"))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the lock, write nothing")
    parser.add_argument(
        "--wheels",
        type=Path,
        default=Path(os.environ.get("QWEN_LAB_CACHE", Path.home() / ".cache" / "qwen-deploy-lab"))
        / "resolver-wheels",
        help="cache folder for wheels built from source-only requirements",
    )
    args = parser.parse_args()
    pip_version = check_interpreter()
    args.wheels.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for requirements in sorted(REQUIREMENTS.glob("core-gpu*.txt")):
        profile = requirements.stem.removeprefix("core-")
        print(f"==> {profile}: resolving {requirements.name} from PyPI metadata", flush=True)
        profiles[profile] = summarize(profile, requirements, resolve(requirements, args.wheels))
        summary = profiles[profile]
        print(
            f"    {summary['packages']} packages, torch {summary['versions']['torch']} "
            f"(CUDA {summary['torch_cuda']}), vllm {summary['versions'].get('vllm')}",
            flush=True,
        )
    lock = {
        "comment": "Written by tools/resolve_gpu_profiles.py from PyPI metadata; do not edit.",
        "resolved": {
            "date": dt.date.today().isoformat(),
            "pip": pip_version,
            "python_version": PYTHON_VERSION,
            "platforms": PLATFORMS,
            "index": os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"),
        },
        "profiles": profiles,
    }
    if args.check:
        old = json.loads(LOCK.read_text(encoding="utf-8"))["profiles"] if LOCK.exists() else {}
        if old != profiles:
            sys.exit(
                f"{LOCK.relative_to(ROOT)} differs from today's resolution: run without --check"
            )
        print(f"{LOCK.relative_to(ROOT)} matches today's resolution")
        return
    LOCK.write_text(json.dumps(lock, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {LOCK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
