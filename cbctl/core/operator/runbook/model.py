"""The runbook model: a validated runbook (:class:`Runbook`, its :class:`Step` s and variables),
variable values (``--var``, defaults, secrets masked). The record of a run is
:class:`cbctl.core.model.records.RunRecord`.

Pure data and functions, no I/O. The file format and the run record are described in
docs/operator.md; the parser is :mod:`cbctl.core.operator.runbook.parser`.
"""

from __future__ import annotations

import math
import operator
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cbctl.core.model.errors import BadInput

SECRET_PLACEHOLDER: Final = "<secret>"

StepKind = Literal["run", "argv", "check"]

VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A well-formed placeholder; anything else containing "{{" is an error, not literal text.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_EXPECT_RE = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class RunbookError(BadInput):
    """A runbook file is invalid (exit 2). The message is ``FILE:LINE: reason``."""

    def __init__(self, where: str, line: int | None, reason: str) -> None:
        super().__init__(f"{where}:{line}: {reason}" if line else f"{where}: {reason}")
        self.where = where
        self.line = line
        self.reason = reason


class RunbookErrors(RunbookError):
    """Several problems in one runbook (exit 2): every one of them, in line order, one
    ``FILE:LINE: reason`` per line of the message. ``errors`` holds them; the first also fills
    ``where``/``line``/``reason``."""

    def __init__(self, errors: list[RunbookError]) -> None:
        ordered = sorted(errors, key=lambda e: (e.line or 0))
        first = ordered[0]
        super().__init__(first.where, first.line, first.reason)
        self.errors = ordered
        self.args = ("\n".join(str(e) for e in ordered),)


def raise_all(errors: list[RunbookError]) -> None:
    """Raise the one error, or :class:`RunbookErrors` for several; nothing when empty."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise RunbookErrors(errors)


@dataclass(frozen=True)
class VarSpec:
    """A declared variable. ``default`` is the YAML scalar's text (``3`` stays ``"3"``)."""

    name: str
    required: bool = False
    default: str | None = None
    secret: bool = False
    description: str = ""
    line: int = 0


@dataclass(frozen=True)
class Expectation:
    """``OP NUMBER`` as written in a check's ``expect``."""

    op: str
    threshold: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Expectation:
        """Raises ``ValueError`` when ``text`` is not ``OP NUMBER``."""
        m = _EXPECT_RE.match(text)
        if not m:
            raise ValueError(text)
        return cls(m.group(1), float(m.group(2)), f"{m.group(1)} {m.group(2)}")

    def holds(self, value: float) -> bool:
        """NaN never holds (a comparison with NaN is false, even ``!=`` here)."""
        if math.isnan(value):
            return False
        return _OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class CheckSpec:
    promql: str  # template: may contain {{var}}
    expect: Expectation
    within: float  # seconds; 0 = evaluate once
    interval: float


@dataclass(frozen=True)
class Step:
    """One step. ``argv`` holds templates (placeholders unsubstituted) for run/argv steps."""

    index: int  # 1-based
    line: int
    kind: StepKind
    source: str  # as written: the run line, the argv list, or the check
    argv: tuple[str, ...] = ()
    check: CheckSpec | None = None
    confirm: str | None = None
    description: str = ""

    @property
    def in_process(self) -> bool:
        """True for steps that run a cbctl command in-process."""
        return self.kind in ("run", "argv") and bool(self.argv) and self.argv[0] == "cbctl"

    def render_argv(self, values: Mapping[str, str]) -> list[str]:
        """The argv with each element's placeholders replaced literally (never re-split)."""
        return [substitute(a, values) for a in self.argv]

    def render_text(self, values: Mapping[str, str]) -> str:
        """One line to show an operator: a shell-quoted argv or ``check: QUERY EXPECT within``."""
        if self.check is not None:
            within = f" within {self.check.within:g}s" if self.check.within else ""
            return f"check {substitute(self.check.promql, values)} {self.check.expect.text}{within}"
        return shlex.join(self.render_argv(values))

    def render_confirm(self, values: Mapping[str, str]) -> str | None:
        return None if self.confirm is None else substitute(self.confirm, values)


@dataclass(frozen=True)
class Runbook:
    name: str
    summary: str
    kind: Literal["rollback", "procedure"]
    steps: tuple[Step, ...]
    vars: Mapping[str, VarSpec] = field(default_factory=dict)
    description: str = ""
    path: str = ""  # as shown in messages
    drill: str | None = None  # the capability whose rollback this runbook drills (``drill:``)
    sha256: str = ""  # of the file's text: a resumed run must be of the same runbook

    def public(self) -> dict[str, Any]:
        """The ``runbook show -o json`` shape."""
        return {
            "name": self.name,
            "kind": self.kind,
            "drill": self.drill,
            "summary": self.summary,
            "description": self.description,
            "path": self.path,
            "vars": {
                v.name: {"required": v.required, "default": None if v.secret else v.default, "secret": v.secret,
                         "description": v.description}
                for v in self.vars.values()
            },
            "steps": [
                {
                    "index": s.index,
                    "line": s.line,
                    "kind": s.kind,
                    "text": s.source,
                    "confirm": s.confirm,
                    "description": s.description,
                }
                for s in self.steps
            ],
        }


def substitute(template: str, values: Mapping[str, str]) -> str:
    # A function replacement: the value is inserted verbatim (no backslash processing), and
    # the result is not scanned again, so a value containing "{{x}}" stays literal.
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_var_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> dict. The value is everything after the first ``=``, verbatim."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not VAR_NAME_RE.match(name):
            raise BadInput(f"--var {item!r}: expected NAME=VALUE")
        if name in out:
            raise BadInput(f"--var {name}: given twice")
        out[name] = value
    return out


def resolve_vars(runbook: Runbook, given: Mapping[str, str]) -> dict[str, str]:
    """Every declared variable's value: given, else default, else ``""`` for optional ones.

    Raises ``BadInput`` for an undeclared name, or — naming the declaration's ``file:line`` —
    for a required variable that was not given.
    """
    unknown = sorted(set(given) - set(runbook.vars))
    if unknown:
        known = ", ".join(sorted(runbook.vars)) or "none"
        raise BadInput(f"--var {unknown[0]}: runbook {runbook.name!r} has no such variable (declared: {known})")
    values: dict[str, str] = {}
    for spec in runbook.vars.values():
        if spec.name in given:
            values[spec.name] = given[spec.name]
        elif spec.default is not None:
            values[spec.name] = spec.default
        elif spec.required:
            raise RunbookError(runbook.path, spec.line,
                               f"var {spec.name!r} is required; pass --var {spec.name}=VALUE")
        else:
            values[spec.name] = ""
    return values


def masked(runbook: Runbook, values: Mapping[str, str]) -> dict[str, str]:
    """``values`` with every secret variable's value replaced by a placeholder."""
    return {k: (SECRET_PLACEHOLDER if runbook.vars.get(k, VarSpec(k)).secret else v) for k, v in values.items()}


def resume_command(runbook: Runbook, values: Mapping[str, str], from_step: int, *,
                   prefix: Sequence[str] = ("cbctl",), extra: Sequence[str] = (), resumes: str | None = None,
                   target: str | None = None) -> str:
    """The command that resumes ``runbook`` at ``from_step`` with the same variables.

    ``prefix`` carries global options (``cbctl --context prod``), ``extra`` options such as
    ``--dir``; ``resumes`` is the id of the stopped run (``--resumes RUN``), which links the two
    runs into one chain; ``target`` is what to name instead of the runbook's name (the file's
    path, for a runbook given by path: its name is not in any runbooks directory). Secret values
    appear as ``<secret>``: they are never printed.
    """
    argv = [*prefix, "runbook", "run", target or runbook.name, "--from-step", str(from_step)]
    if resumes:
        argv += ["--resumes", resumes]
    argv += [*extra]
    for name, value in masked(runbook, values).items():
        argv += ["--var", f"{name}={value}"]
    return shlex.join(argv)
