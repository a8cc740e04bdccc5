"""Just enough PromQL reading to check what a dashboard or alert rule queries.

``selectors(expr)`` finds every instant/range vector selector (``metric{matchers}``)
and ``grouping_labels(expr)`` the labels of ``by (...)`` / ``without (...)`` clauses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}
_SELECTOR = re.compile(r"(?<![\w\"$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class Selector:
    """``metric{label op "value", ...}``: the metric name and its label matchers."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...] = field(default=())

    def matcher(self, label: str) -> tuple[str, str] | None:
        """``(op, value)`` of the matcher on ``label``, or None."""
        for name, op, value in self.matchers:
            if name == label:
                return op, value
        return None


def _strip_strings_and_durations(expr: str) -> str:
    # Durations like [5m] and template variables like $__rate_interval are not selectors.
    return re.sub(r"\[[^\]]*\]", "", expr)


def _parse_matchers(body: str, expr: str) -> tuple[tuple[str, str, str], ...]:
    inner = body[1:-1]
    out = []
    pos = 0
    while pos < len(inner):
        m = _MATCHER.match(inner, pos)
        if not m:
            raise ValueError(f"cannot parse label matchers {body!r} in {expr!r}")
        out.append((m.group(1), m.group(2), m.group(3)))
        pos = m.end()
    return tuple(out)


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of ``expr`` (function names and keywords are skipped)."""
    text = _strip_strings_and_durations(expr)
    text_no_groupings = _GROUPING.sub("", text)
    found = []
    for m in _SELECTOR.finditer(text_no_groupings):
        name, body = m.group(1), m.group(2)
        rest = text_no_groupings[m.end() :].lstrip()
        if name.lower() in KEYWORDS or (rest.startswith("(") and not body):
            continue  # a keyword or a function call such as rate(...)
        if re.fullmatch(r"\d.*", name):
            continue
        found.append(Selector(name, _parse_matchers(body, expr) if body else ()))
    return found


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by (...)`` and ``without (...)`` clauses."""
    labels: set[str] = set()
    for m in _GROUPING.finditer(expr):
        labels.update(x.strip() for x in m.group(1).split(",") if x.strip())
    return labels


def balanced(expr: str) -> bool:
    """True when (), [] and {} nest correctly."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack
