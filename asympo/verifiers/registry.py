"""Verifiers by name: the builtins, configured plug-ins, ``module:function`` and entry points.

Resolution order for a name: ``RewardSettings.plugins`` (name -> ``module:function``),
the builtins (``math``, ``gsm8k``, ``exact``, ``boxed``), a literal ``module:function``, then
the ``asympo.verifiers`` entry-point group of installed packages.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from importlib.metadata import entry_points

from asympo.verifiers.boxed import verify_boxed
from asympo.verifiers.exact import verify_exact
from asympo.verifiers.gsm8k import has_gsm8k_format, verify_gsm8k
from asympo.verifiers.math_equiv import has_boxed_format, verify_math
from asympo.verifiers.verdict import CORRECT, WRONG, Verdict, VerifierFn, as_verdict

ENTRY_POINT_GROUP = "asympo.verifiers"
BUILTIN: dict[str, VerifierFn] = {
    "math": verify_math,
    "gsm8k": verify_gsm8k,
    "exact": verify_exact,
    "boxed": verify_boxed,
}
FORMAT_CHECKS = {"math": has_boxed_format, "gsm8k": has_gsm8k_format, "boxed": has_boxed_format}
MAX_REASON_CHARS = 300


class UnknownVerifierError(ValueError):
    """No verifier of that name, or its ``module:function`` cannot be imported."""


def import_function(spec: str) -> VerifierFn:
    """Import ``"package.module:function"``; raise UnknownVerifierError with the cause."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UnknownVerifierError(f"verifier spec {spec!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error of user code
        raise UnknownVerifierError(f"cannot import verifier module {module_name!r}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UnknownVerifierError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(target):
        raise UnknownVerifierError(f"verifier {spec!r} is not callable")
    return target


def _entry_point(name: str) -> VerifierFn | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                loaded = ep.load()
            except Exception as exc:  # any import-time error of user code
                raise UnknownVerifierError(f"entry point verifier {name!r}: {exc}") from exc
            if not callable(loaded):
                raise UnknownVerifierError(f"entry point verifier {name!r} is not callable")
            return loaded  # type: ignore[no-any-return]
    return None


def available_verifiers(plugins: Mapping[str, str] | None = None) -> list[str]:
    """Every name that resolves without a ``module:function`` spec."""
    names = set(BUILTIN) | set(plugins or {})
    names |= {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def resolve_verifier(name: str, plugins: Mapping[str, str] | None = None) -> VerifierFn:
    """The verifier function for ``name`` (see module docstring for the order)."""
    if plugins and name in plugins:
        return import_function(plugins[name])
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        return import_function(name)
    found = _entry_point(name)
    if found is None:
        known = ", ".join(available_verifiers(plugins))
        raise UnknownVerifierError(
            f"unknown verifier {name!r}; known: {known} (or module:function)"
        )
    return found


def apply_format_reward(
    name: str, verdict: Verdict, response: str, format_reward: float
) -> Verdict:
    """Give ``format_reward`` to a wrong but well-formed answer (``####``/``\\boxed``)."""
    check = FORMAT_CHECKS.get(name)
    if format_reward <= 0 or check is None or verdict.reward > 0 or verdict.failed:
        return verdict
    if verdict.timed_out or not check(response):
        return verdict
    return Verdict(format_reward, f"{verdict.reason} (well formatted)", shaped=True)


def run_verifier(
    fn: VerifierFn, name: str, response: str, reference: str, format_reward: float = 0.0
) -> Verdict:
    """Call ``fn`` in this process and normalise its result; errors become failed verdicts.

    There is no time limit here: the VerifierPool runs this in a worker it can kill.
    """
    try:
        verdict = as_verdict(fn(response, reference))
    except Exception as exc:  # a verifier may raise anything; the reason says what
        reason = f"verifier error: {type(exc).__name__}: {exc}"
        return Verdict(0.0, reason[:MAX_REASON_CHARS], failed=True)
    if not math.isfinite(verdict.reward):
        return Verdict(0.0, f"verifier returned a non-finite reward {verdict.reward}", failed=True)
    reason = verdict.reason[:MAX_REASON_CHARS] or (CORRECT if verdict.reward > 0 else WRONG)
    verdict = dataclasses.replace(verdict, reason=reason)
    return apply_format_reward(name, verdict, response, format_reward)
