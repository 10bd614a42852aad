"""Do the installed versions, the driver, the GPU and the CPU fit together? Notebook 00's
``check_compat(machine.collect_report())`` evaluates the rules kept as data in
``labhelpers/data/compat_rules.json`` (its ``_doc`` describes the rule kinds; add a rule there)
and returns one :class:`Finding` per problem, each with a concrete fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from labhelpers.machine import Report

_RULES_FILE = Path(__file__).resolve().parent / "data" / "compat_rules.json"
_LEVELS = ("ok", "info", "warn", "error")
_ICON = {"ok": "✅", "info": "ℹ️ ", "warn": "⚠️ ", "error": "❌"}
_Rule = Mapping[str, Any]


@dataclass
class Finding:
    """One verdict. ``level``: 'ok' | 'info' | 'warn' | 'error'."""

    level: str
    rule: str
    message: str
    fix: str = ""
    subject: str | None = None

    def __str__(self) -> str:
        text = f"{_ICON.get(self.level, '')} [{self.rule}] {self.message}"
        return text + (f"\n   fix: {self.fix}" if self.fix and self.level != "ok" else "")


class _Values(dict):
    def __missing__(self, key: str) -> str:  # unknown placeholders stay as they are
        return "{" + key + "}"


def _finding(rule: _Rule, subject: str | None, fix: str | None = None, **values: Any) -> Finding:
    message, fix = (t.format_map(_Values(values)) for t in (rule["message"], fix or rule["fix"]))
    return Finding(rule["level"], rule["id"], message, fix, subject)


def _ok(rule: _Rule, detail: str, subject: str | None = None) -> Finding:
    return Finding("ok", rule["id"], f"passes: {detail}", "", subject)


def _version_matches(version: str | None, spec: str = "") -> bool:
    """Whether a version satisfies a PEP 440 specifier ('' = any); '2.13.0+cpu' matches
    '==2.13.0' as in pip."""
    try:
        return version is not None and SpecifierSet(spec).contains(Version(version), True)
    except InvalidVersion:
        return False


def _local(version: str | None) -> str | None:
    try:
        return Version(version).local if version else None
    except InvalidVersion:
        return None


def _matches(cond: Mapping[str, Any], report: Report) -> bool:
    version = report.package(cond["package"])
    local = _local(version)
    return (
        _version_matches(version, cond.get("spec", ""))
        and cond.get("local", local) == local
        and ("local_not" not in cond or local != cond["local_not"])
    )


def _requires(rule: _Rule, report: Report) -> list[Finding]:
    if not all(_matches(c, report) for c in rule["when"]):
        return []
    when = " and ".join(f"{c['package']} {report.package(c['package'])}" for c in rule["when"])
    out = []
    for need in rule["need"]:
        pkg, spec = need["package"], need.get("spec", "")
        have = report.package(pkg)
        if have is None and not need.get("must_be_installed", False):
            continue
        if _version_matches(have, spec):
            out.append(_ok(rule, f"{pkg} {have} satisfies '{spec}' (with {when})", pkg))
        else:
            values = dict(pkg=pkg, spec=spec, have=have or "not installed", when=when)
            out.append(_finding(rule, pkg, need.get("fix"), **values))
    return out


def _conflict(rule: _Rule, report: Report) -> list[Finding]:
    first, second = rule["packages"]
    a, b = first["package"], second["package"]
    if not (_matches(first, report) and _matches(second, report)):
        return [_ok(rule, f"not both {a} and {b}")] if report.package(a) else []
    versions = dict(a_version=report.package(a), b_version=report.package(b))
    return [_finding(rule, a, a=a, b=b, **versions)]


def _gpu_capability(rule: _Rule, report: Report) -> list[Finding]:
    out = []
    for gpu in (g for g in report.gpus if g.capability is not None):
        subject, cc = f"GPU {gpu.index}", gpu.capability_text
        if tuple(gpu.capability) >= tuple(rule["min"]):
            out.append(_ok(rule, f"{gpu.name} has compute capability {cc}", subject))
        else:
            need = "{}.{}".format(*rule["min"])
            out.append(_finding(rule, subject, gpu=gpu.name, index=gpu.index, cc=cc, min=need))
    return out


def _cpu(rule: _Rule, report: Report) -> list[Finding]:
    if rule.get("arch") and report.machine.lower() not in rule["arch"]:
        return []
    if rule["check"] == "flag_missing":
        if report.cpu_flags is None:
            return []
        failed = rule["flag"] not in report.cpu_flags
    else:  # vendor_not
        if report.cpu_vendor is None:
            return []
        failed = report.cpu_vendor != rule["vendor"]
    model = report.cpu_model or "unknown"
    if not failed:
        return [_ok(rule, f"CPU {model}", "CPU")]
    return [_finding(rule, "CPU", model=model, vendor=report.cpu_vendor, flag=rule.get("flag"))]


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def _cuda(rule: _Rule, r: Report) -> list[Finding]:
    """A CPU torch beside a GPU; a driver older than torch's CUDA major; an nvcc whose CUDA
    major differs from torch's (GPTQModel compiles its Marlin kernels with nvcc at the first
    GPU load). Minor CUDA versions are compatible."""
    torch_cuda, driver, check = _major(r.torch_cuda), _major(r.driver_cuda), rule["check"]
    if check == "cpu_build_with_gpu":
        applies, failed = bool(r.gpus and r.torch_version), r.torch_build == "cpu"
    elif check == "driver_older_than_torch":
        applies, failed = None not in (torch_cuda, driver), (driver or 0) < (torch_cuda or 0)
    elif check == "nvcc_mismatch":
        applies, failed = bool(r.gpus) and torch_cuda is not None, _major(r.nvcc_cuda) != torch_cuda
    else:
        raise ValueError(f"compat rule {rule['id']!r}: unknown cuda check {check!r}")
    if not applies:
        return []
    if not failed:
        return [_ok(rule, f"{check}: fine", "CUDA")]
    gpu, nvcc = r.gpus[0].name if r.gpus else None, r.nvcc_cuda or "not installed"
    facts = dict(torch=r.torch_version, torch_cuda=r.torch_cuda, gpu=gpu, nvcc=nvcc)
    return [_finding(rule, "CUDA", driver=r.nvidia_driver, driver_cuda=r.driver_cuda, **facts)]


# ---------------------------------------------- issue 16: kernels per device, disk, model types


def _kernel_table(rule: _Rule, report: Report) -> list[Finding]:
    """Which int4/fp8 kernels of each engine this device can use. ``device: "gpu"``: a row
    needs compute capability ``min``; ``"cpu"``: every flag in ``flags`` (and ``vendor``)."""
    rows = rule["kernels"]
    if rule["device"] == "gpu":
        devices = [(f"GPU {g.index}", g.name, g.capability_text,
                    lambda r, g=g: tuple(g.capability) >= tuple(r["min"]))
                   for g in report.gpus if g.capability is not None]  # fmt: skip
    elif report.cpu_flags is None or report.machine.lower() not in rule.get("arch", ["x86_64"]):
        return []
    else:

        def cpu_has(r: _Rule, flags: set[str] = report.cpu_flags) -> bool:
            return set(r.get("flags", [])) <= flags and r.get("vendor") in (None, report.cpu_vendor)

        devices = [("CPU", report.cpu_model or "unknown", None, cpu_has)]
    out = []
    for subject, name, cc, works in devices:
        usable = [f"{r['engine']} {r['kernel']}" for r in rows if works(r)]
        needs = [f"{r['engine']} {r['kernel']} (needs {_need(r)})" for r in rows if not works(r)]
        if not needs:
            out.append(_ok(rule, f"{name} can use {', '.join(usable)}", subject))
            continue
        text = dict(usable=", ".join(usable) or "none", unusable="; ".join(needs))
        out.append(_finding(rule, subject, device=name, cc=cc, **text))
    return out


def _need(row: _Rule) -> str:
    if "min" in row:
        return "compute capability {}.{}".format(*row["min"])
    vendor = [f"a {row['vendor']} CPU"] if "vendor" in row else []
    return " and ".join([*row.get("flags", []), *vendor])


def _disk(rule: _Rule, report: Report) -> list[Finding]:
    """Free disk where the models go (the report's ``disk_path``, the course cache) against the
    models.json download sizes of ``models`` x ``margin``; ``gpu`` true/false: only on
    machines with / without an NVIDIA GPU."""
    if report.disk_free_gib is None or rule.get("gpu", bool(report.gpus)) != bool(report.gpus):
        return []
    from labhelpers.files import GB, GIB
    from labhelpers.models import registry

    need = sum(registry()[m].size_gb for m in rule["models"]) * rule.get("margin", 1.1)
    free = report.disk_free_gib * GIB / GB
    if free >= need:
        return [_ok(rule, f"{free:.1f} GB free at {report.disk_path}", "disk")]
    values = dict(path=report.disk_path, free=f"{free:.1f}", need=f"{need:.1f}")
    return [_finding(rule, "disk", models=", ".join(rule["models"]), **values)]


def _model_types(rule: _Rule, report: Report) -> list[Finding]:
    """The ``model_type`` values (config.json) the installed ``package`` does not know yet:
    ``types`` maps each to the versions that know it."""
    pkg, have = rule["package"], report.package(rule["package"])
    if have is None:
        return []
    unknown = {t: spec for t, spec in rule["types"].items() if not _version_matches(have, spec)}
    if not unknown:
        return [_ok(rule, f"{pkg} {have} knows {', '.join(rule['types'])}", pkg)]
    types = ", ".join(f"'{t}' (needs {pkg}{spec})" for t, spec in unknown.items())
    return [_finding(rule, pkg, pkg=pkg, have=have, types=types, first=next(iter(unknown)))]


_CHECKERS = {
    "requires": (_requires, ("when", "need")),
    "conflict": (_conflict, ("packages",)),
    "gpu_capability": (_gpu_capability, ("min",)),
    "cpu": (_cpu, ("check",)),
    "cuda": (_cuda, ("check",)),
    "kernel_table": (_kernel_table, ("device", "kernels")),
    "disk": (_disk, ("models",)),
    "model_types": (_model_types, ("package", "types")),
}


def _load_rules(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rules, checked: a malformed rule raises ValueError naming its id."""
    rules = json.loads(Path(path or _RULES_FILE).read_text(encoding="utf-8"))["rules"]
    for rule in rules:
        kind = rule.get("kind")
        needed = ("id", "kind", "level", "message", "fix", *_CHECKERS.get(kind, ((), ()))[1])
        missing = [k for k in needed if k not in rule]
        if kind not in _CHECKERS or missing or rule["level"] not in _LEVELS[1:]:
            raise ValueError(
                f"compat rule {rule.get('id')!r}: kind {kind!r} (known: {', '.join(_CHECKERS)}), "
                f"level {rule.get('level')!r} (info/warn/error), missing keys {missing}"
            )
        for cond in [*rule.get("when", []), *rule.get("need", []), *rule.get("packages", [])]:
            SpecifierSet(cond.get("spec", ""))  # raises InvalidSpecifier (a ValueError)
        for spec in rule.get("types", {}).values():
            SpecifierSet(spec)
    return rules


def check_compat(report: Report, rules: Iterable[_Rule] | None = None, *,
                 include_ok: bool = False, only: Iterable[str] = ()) -> list[Finding]:  # fmt: skip
    """Evaluate the rules (default: data/compat_rules.json) against a report, worst first;
    ``only``: the rule ids or kinds to evaluate. Rules that do not apply (their packages absent,
    no GPU, facts unknown) say nothing; passing ones only with ``include_ok``."""
    chosen, wanted = list(rules or _load_rules()), set(only)
    if wanted:
        unknown = wanted - {r["id"] for r in chosen} - {r["kind"] for r in chosen}
        if unknown:
            raise ValueError(f"no compat rule has the id or kind {sorted(unknown)}")
        chosen = [r for r in chosen if r["id"] in wanted or r["kind"] in wanted]
    found = [f for r in chosen for f in _CHECKERS[r["kind"]][0](r, report)]
    found = [f for f in found if include_ok or f.level != "ok"]
    return sorted(found, key=lambda f: -_LEVELS.index(f.level))
