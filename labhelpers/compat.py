"""Do the installed versions, the GPU and the CPU fit together? Rules kept as data.

Used by notebook 00_env_check: ``check_compat(env.collect_report())`` evaluates the rules in
``labhelpers/data/compat_rules.json`` (edit that file to add a rule; its ``_doc`` describes
the rule kinds) and returns a ``Finding`` per problem, each with a concrete fix.

Importing this module is instant: standard library and ``packaging`` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from labhelpers.env import EnvReport, local_version_tag

RULES_FILE = Path(__file__).resolve().parent / "data" / "compat_rules.json"

LEVELS: tuple[str, ...] = ("ok", "info", "warn", "error")
_LEVEL_ICON = {"ok": "✅", "info": "ℹ️ ", "warn": "⚠️ ", "error": "❌"}


@dataclass
class Finding:
    """One compatibility verdict. ``level``: 'ok' | 'info' | 'warn' | 'error'."""

    level: str
    rule: str
    message: str
    fix: str = ""
    subject: str | None = None

    def __str__(self) -> str:
        text = f"{_LEVEL_ICON.get(self.level, '')} [{self.rule}] {self.message}"
        return text + (f"\n   fix: {self.fix}" if self.fix and self.level != "ok" else "")


class _Template(dict):
    """str.format_map mapping that leaves unknown placeholders as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _render(template: str, **values: Any) -> str:
    return template.format_map(_Template(values))


_COMMON_KEYS = ("id", "kind", "level", "message", "fix")
_KIND_KEYS = {
    "requires": ("when", "need"),
    "conflict": ("packages",),
    "gpu_capability": ("min",),
    "cpu": ("check",),
    "torch_build": ("check",),
}
_CPU_CHECKS = {"flag_missing": "flag", "vendor_not": "vendor"}
_TORCH_CHECKS = ("cpu_build_with_gpu",)


def validate_rule(rule: Mapping[str, Any]) -> None:
    """Raise ValueError naming the rule id if a rule is malformed or of an unknown kind."""
    rid = rule.get("id", "<no id>")
    kind = rule.get("kind")
    if kind not in _KIND_KEYS:
        raise ValueError(
            f"compat rule {rid!r}: unknown kind {kind!r} (known: {sorted(_KIND_KEYS)})"
        )
    missing = [k for k in _COMMON_KEYS + _KIND_KEYS[kind] if k not in rule]
    if missing:
        raise ValueError(f"compat rule {rid!r}: missing keys {missing}")
    if rule["level"] not in LEVELS[1:]:
        raise ValueError(f"compat rule {rid!r}: level {rule['level']!r} not in {LEVELS[1:]}")
    conditions = list(rule.get("when", [])) + list(rule.get("need", []))
    conditions += list(rule.get("packages", []))
    for cond in conditions:
        _validate_condition(rid, cond)
    if kind == "conflict" and len(rule["packages"]) != 2:
        raise ValueError(f"compat rule {rid!r}: 'packages' must hold exactly two conditions")
    if kind == "cpu" and _CPU_CHECKS.get(rule["check"]) not in rule:
        raise ValueError(f"compat rule {rid!r}: cpu check must be one of {_CPU_CHECKS} + its key")
    if kind == "torch_build" and rule["check"] not in _TORCH_CHECKS:
        raise ValueError(f"compat rule {rid!r}: torch_build check must be one of {_TORCH_CHECKS}")
    if kind == "gpu_capability" and len(rule["min"]) != 2:
        raise ValueError(f"compat rule {rid!r}: 'min' must be [major, minor]")


def _validate_condition(rid: str, cond: Mapping[str, Any]) -> None:
    if "package" not in cond:
        raise ValueError(f"compat rule {rid!r}: condition without 'package': {cond}")
    try:
        SpecifierSet(cond.get("spec", ""))
    except InvalidSpecifier as exc:
        raise ValueError(f"compat rule {rid!r}: bad version specifier: {exc}") from exc


def load_rules(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The compatibility rules (default: labhelpers/data/compat_rules.json), validated.
    Used by notebook 00_env_check."""
    data = json.loads(Path(path or RULES_FILE).read_text(encoding="utf-8"))
    rules = data["rules"] if isinstance(data, dict) else data
    for rule in rules:
        validate_rule(rule)
    return rules


def version_matches(version: str | None, spec: str = "") -> bool:
    """Whether an installed version satisfies a PEP 440 specifier ('' = any version).
    Local versions compare as in pip: '2.13.0+cpu' satisfies '==2.13.0'."""
    if version is None:
        return False
    if not spec:
        return True
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _condition_matches(cond: Mapping[str, Any], report: EnvReport) -> bool:
    version = report.package(cond["package"])
    if not version_matches(version, cond.get("spec", "")):
        return False
    local = local_version_tag(version)
    if "local" in cond and local != cond["local"]:
        return False
    return not ("local_not" in cond and local == cond["local_not"])


def _describe(report: EnvReport, conditions: Iterable[Mapping[str, Any]]) -> str:
    return " and ".join(f"{c['package']} {report.package(c['package'])}" for c in conditions)


def _ok(rule: Mapping[str, Any], detail: str, subject: str | None = None) -> Finding:
    return Finding("ok", rule["id"], f"passes: {detail}", "", subject)


def _check_requires(rule: Mapping[str, Any], report: EnvReport) -> list[Finding]:
    if not all(_condition_matches(c, report) for c in rule["when"]):
        return []
    when = _describe(report, rule["when"])
    findings = []
    for need in rule["need"]:
        pkg, spec = need["package"], need.get("spec", "")
        have = report.package(pkg)
        if have is None and not need.get("must_be_installed", False):
            continue
        if version_matches(have, spec):
            findings.append(_ok(rule, f"{pkg} {have} satisfies '{spec}' (with {when})", pkg))
            continue
        values = {"pkg": pkg, "spec": spec, "have": have or "not installed", "when": when}
        fix = _render(need.get("fix", rule["fix"]), **values)
        findings.append(
            Finding(rule["level"], rule["id"], _render(rule["message"], **values), fix, pkg)
        )
    return findings


def _check_conflict(rule: Mapping[str, Any], report: EnvReport) -> list[Finding]:
    first, second = rule["packages"]
    a, b = first["package"], second["package"]
    if not (_condition_matches(first, report) and _condition_matches(second, report)):
        return [_ok(rule, f"not both {a} and {b}")] if report.package(a) else []
    values = {"a": a, "a_version": report.package(a), "b": b, "b_version": report.package(b)}
    message = _render(rule["message"], **values)
    return [Finding(rule["level"], rule["id"], message, _render(rule["fix"], **values), a)]


def _check_gpu_capability(rule: Mapping[str, Any], report: EnvReport) -> list[Finding]:
    minimum = tuple(rule["min"])
    findings = []
    for gpu in report.gpus:
        if gpu.capability is None:
            continue
        values = {
            "gpu": gpu.name,
            "index": gpu.index,
            "cc": gpu.capability_text,
            "min": "{}.{}".format(*minimum),
        }
        subject = f"GPU {gpu.index}"
        if tuple(gpu.capability) >= minimum:
            findings.append(_ok(rule, f"{gpu.name} has compute capability {values['cc']}", subject))
            continue
        message, fix = _render(rule["message"], **values), _render(rule["fix"], **values)
        findings.append(Finding(rule["level"], rule["id"], message, fix, subject))
    return findings


def _check_cpu(rule: Mapping[str, Any], report: EnvReport) -> list[Finding]:
    arch = [a.lower() for a in rule.get("arch", [])]
    if arch and report.machine.lower() not in arch:
        return []
    values = {"model": report.cpu_model or "unknown model", "vendor": report.cpu_vendor}
    if rule["check"] == "flag_missing":
        if report.cpu_flags is None:
            return []
        values["flag"] = rule["flag"]
        failed = rule["flag"] not in report.cpu_flags
    else:
        if report.cpu_vendor is None:
            return []
        failed = report.cpu_vendor != rule["vendor"]
    if not failed:
        return [_ok(rule, f"CPU {values['model']}", "CPU")]
    message, fix = _render(rule["message"], **values), _render(rule["fix"], **values)
    return [Finding(rule["level"], rule["id"], message, fix, "CPU")]


def _check_torch_build(rule: Mapping[str, Any], report: EnvReport) -> list[Finding]:
    if not report.gpus or report.torch_version is None:
        return []
    if report.torch_build != "cpu":
        return [_ok(rule, f"torch {report.torch_version} is a {report.torch_build} build")]
    values = {"torch": report.torch_version, "gpu": report.gpus[0].name}
    message, fix = _render(rule["message"], **values), _render(rule["fix"], **values)
    return [Finding(rule["level"], rule["id"], message, fix, "torch")]


_CHECKERS: dict[str, Callable[[Mapping[str, Any], EnvReport], list[Finding]]] = {
    "requires": _check_requires,
    "conflict": _check_conflict,
    "gpu_capability": _check_gpu_capability,
    "cpu": _check_cpu,
    "torch_build": _check_torch_build,
}


def check_compat(
    report: EnvReport,
    rules: Iterable[Mapping[str, Any]] | None = None,
    *,
    include_ok: bool = False,
) -> list[Finding]:
    """Evaluate the compatibility rules against a report, worst findings first.
    Used by notebook 00_env_check.

    ``rules``: rule dicts (default: labhelpers/data/compat_rules.json); a rule of unknown
    kind raises ValueError naming its id. Rules that do not apply (trigger packages absent,
    no GPU, CPU facts unknown) produce nothing; applicable rules that pass produce 'ok'
    findings only when ``include_ok`` is true.
    """
    rule_list = load_rules() if rules is None else list(rules)
    for rule in rule_list:
        validate_rule(rule)
    findings = [f for rule in rule_list for f in _CHECKERS[rule["kind"]](rule, report)]
    if not include_ok:
        findings = [f for f in findings if f.level != "ok"]
    return sorted(findings, key=lambda f: -LEVELS.index(f.level))
