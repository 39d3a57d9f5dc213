"""Runbooks: on-call procedures as data (``runbooks/*.yaml``), validated, and their executor.

File format (a contract; the shipped ``runbooks/*.yaml`` are examples)::

    name: rollback-event-bus            # required; must equal the file name without .yaml
    summary: Disable bridge consumers   # required; one line
    description: |                      # optional; free text
      ...
    kind: rollback                      # optional: rollback | procedure; default: rollback
                                        #   when the name starts with "rollback-", else procedure
    drill: event-bus                    # optional: this runbook drills that capability's rollback
                                        #   (coordination | event-bus | consumers); see cbctl/core/operator/drills.py
    vars:                               # optional; NAME: {required, default, secret, description}
      reason: {required: true}
      canary_file: {default: canary.txt}
      token: {required: true, secret: true}   # value never stored, shown or put in a resume line
    steps:                              # required, non-empty; each step does exactly one thing
      - run: cbctl rollback event-bus --reason "{{reason}}" --yes
        confirm: "Disable the event-bus bridge on all nodes?"   # optional question
        description: why this step      # optional
      - check: {promql: "max(event_bus_degraded)", expect: "== 0", within: 60s, interval: 5s}
      - argv: [/usr/local/bin/notify, "rollback of {{reason}}"]  # another program, no shell

Variables (``{{name}}``) are substituted **after** a ``run`` line has been split into argv with
:func:`shlex.split`, one argv element at a time, single pass: a value is never parsed by a
shell, never re-split and never re-expanded, so ``"; rm -rf / $(x)"`` stays one literal
argument.  ``run`` lines must start with ``cbctl`` and run in-process (the CLI hands the
executor a ``run_cbctl(argv) -> exit code`` callable); ``argv`` steps run a program directly,
without a shell, and their program (``argv[0]``) may not contain a variable.

A ``check`` polls an instant PromQL query every ``interval`` (default 5s, at most ``within``)
until every returned sample satisfies ``expect`` (``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``
and a number) or ``within`` (default: one evaluation) has passed.  No data never satisfies a
check.

Every validation error names the file and 1-based line: ``runbooks/x.yaml:7: step 2: unknown
key 'rn'``.  Run records are stored at :func:`cbctl.core.model.keys.runbook_run`.  Each step's record
carries the store revisions that bracket it (``revisions: [before, after]``: every write the step
made has a revision strictly between them), so the audit entries a step wrote can be found
again.  Whether a run is a rollback drill is decided from that evidence by
:mod:`cbctl.core.operator.drills`, never from a run's name or status alone.

A run resumed with ``--from-step`` names the run it continues (``resumes``); the resume line a
stopped run prints carries it.  An interrupted run (SIGINT/SIGTERM) ends ``interrupted`` with the
step reached, its resume line and the rollback overrides left in force (``overrides``).

No typer/rich here and no printing: the executor reports through callables it is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

import yaml

from cbctl.core.model import keys
from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError, NotFound

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator

log = logging.getLogger(__name__)

__all__ = [
    "CheckSpec",
    "Expectation",
    "RunRecord",
    "Runbook",
    "RunbookError",
    "RunbookExecutor",
    "Step",
    "StepOutcome",
    "VarSpec",
    "default_runbooks_dir",
    "find_runbook",
    "list_runs",
    "load_all",
    "load_runbook",
    "new_run_id",
    "parse_var_assignments",
    "resolve_vars",
    "resume_command",
    "save_run",
]

ENV_DIR: Final = "CBCTL_RUNBOOKS_DIR"
SECRET_PLACEHOLDER: Final = "<secret>"
DEFAULT_INTERVAL: Final = 5.0
MAX_BYTES: Final = 1024 * 1024

StepKind = Literal["run", "argv", "check"]
RunStatus = Literal["running", "completed", "failed", "aborted", "interrupted"]
# Statuses of a run that stopped part-way and may be resumed (``--from-step N --resumes RUN``).
STOPPED: Final = ("failed", "aborted", "interrupted")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A well-formed placeholder; anything else containing "{{" is an error, not literal text.
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_EXPECT_RE = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

_TOP_KEYS: Final = ("name", "summary", "description", "kind", "drill", "vars", "steps")
_STEP_KINDS: Final = ("run", "argv", "check")
_STEP_KEYS: Final = (*_STEP_KINDS, "confirm", "description")
_CHECK_KEYS: Final = ("promql", "expect", "within", "interval")
_VAR_KEYS: Final = ("required", "default", "secret", "description")
_KINDS: Final = ("rollback", "procedure")


class RunbookError(BadInput):
    """A runbook file is invalid (exit 2). The message is ``FILE:LINE: reason``."""

    def __init__(self, where: str, line: int | None, reason: str) -> None:
        super().__init__(f"{where}:{line}: {reason}" if line else f"{where}: {reason}")
        self.where = where
        self.line = line
        self.reason = reason


# -- model -----------------------------------------------------------------------------------


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
        return [_substitute(a, values) for a in self.argv]

    def render_text(self, values: Mapping[str, str]) -> str:
        """One line to show an operator: a shell-quoted argv or ``check: QUERY EXPECT within``."""
        if self.check is not None:
            within = f" within {self.check.within:g}s" if self.check.within else ""
            return f"check {_substitute(self.check.promql, values)} {self.check.expect.text}{within}"
        return shlex.join(self.render_argv(values))

    def render_confirm(self, values: Mapping[str, str]) -> str | None:
        return None if self.confirm is None else _substitute(self.confirm, values)


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


def _substitute(template: str, values: Mapping[str, str]) -> str:
    # A function replacement: the value is inserted verbatim (no backslash processing), and
    # the result is not scanned again, so a value containing "{{x}}" stays literal.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# -- loading and validation ------------------------------------------------------------------


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when under it (``runbooks/x.yaml``)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.startswith("..") else rel


class _Validator:
    """Walks the composed YAML node tree so every error can name its line."""

    def __init__(self, where: str, loader: yaml.SafeLoader) -> None:
        self.where = where
        self.loader = loader

    def fail(self, node: yaml.Node, reason: str) -> NoReturn:
        raise RunbookError(self.where, node.start_mark.line + 1, reason)

    def mapping(self, node: yaml.Node, what: str, allowed: Sequence[str]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Key -> (key node, value node). Unknown and duplicate keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what}: expected a mapping, got {_node_kind(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                self.fail(knode, f"{what}: keys must be plain names")
            key = knode.value
            if key not in allowed:
                self.fail(knode, f"{what}: unknown key {key!r} (expected one of: {', '.join(allowed)})")
            if key in out:
                self.fail(knode, f"{what}: duplicate key {key!r} (first on line {out[key][0].start_mark.line + 1})")
            out[key] = (knode, vnode)
        return out

    def string(self, node: yaml.Node, what: str, *, allow_empty: bool = False) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.fail(node, f"{what}: expected a string, got {_node_kind(node)}")
        if not allow_empty and not node.value.strip():
            self.fail(node, f"{what}: must not be empty")
        return str(node.value)

    def scalar_text(self, node: yaml.Node, what: str) -> str:
        """A scalar's text as written (numbers stay as typed: ``1.10`` is ``"1.10"``)."""
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            self.fail(node, f"{what}: expected a scalar value, got {_node_kind(node)}")
        return str(node.value)

    def boolean(self, node: yaml.Node, what: str) -> bool:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            self.fail(node, f"{what}: expected true or false, got {_node_kind(node)}")
        return bool(self.loader.construct_object(node))

    def duration(self, node: yaml.Node, what: str) -> float:
        from cbctl.core.backends.prometheus import parse_duration

        text = self.scalar_text(node, what)
        try:
            return parse_duration(text, what=what)
        except BadInput:
            self.fail(node, f"{what}: {text!r} is not a duration (like 30s, 500ms, 2m)")

    def placeholders(self, node: yaml.Node, text: str, what: str, declared: Mapping[str, VarSpec]) -> None:
        """Every ``{{...}}`` in ``text`` must be a well-formed reference to a declared var."""
        for m in _PLACEHOLDER.finditer(text):
            if m.group(1) not in declared:
                known = ", ".join(sorted(declared)) or "none"
                self.fail(node, f"{what}: unknown variable {m.group(1)!r} (declared: {known})")
        rest = _PLACEHOLDER.sub("", text)
        if "{{" in rest or "}}" in rest:
            self.fail(node, f"{what}: malformed placeholder in {text!r} (write {{{{name}}}})")


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "nothing"
    return f"{node.tag.rsplit(':', 1)[-1]} {node.value!r}"


def parse_runbook(text: str, *, where: str, expected_name: str | None = None) -> Runbook:
    """Validate a runbook's YAML text. ``where`` names it in errors; ``expected_name`` (the
    file name without ``.yaml``) must equal its ``name`` when given.

    Raises :class:`RunbookError` (``where:line: reason``) at the first problem.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            hint = ""
            if exc.problem == "mapping values are not allowed here":
                hint = " (a value containing ': ' must be quoted: put the whole line in single quotes)"
            raise RunbookError(where, mark.line + 1 if mark else None, f"not valid YAML: {exc.problem}{hint}") from None
        except yaml.YAMLError as exc:
            raise RunbookError(where, None, f"not valid YAML: {exc}") from None
        if root is None:
            raise RunbookError(where, None, "empty file")
        rb = _build(_Validator(where, loader), root, expected_name)
        return replace(rb, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
    finally:
        loader.dispose()


def _build(v: _Validator, root: yaml.Node, expected_name: str | None) -> Runbook:
    top = v.mapping(root, "runbook", _TOP_KEYS)
    for required in ("name", "summary", "steps"):
        if required not in top:
            v.fail(root, f"missing required key {required!r}")

    name_node = top["name"][1]
    name = v.string(name_node, "name")
    if not _NAME_RE.match(name):
        v.fail(name_node, f"name {name!r}: use lowercase letters, digits and '-'")
    if expected_name is not None and name != expected_name:
        v.fail(name_node, f"name {name!r} does not match the file name {expected_name + '.yaml'!r}")
    summary = v.string(top["summary"][1], "summary")
    description = v.string(top["description"][1], "description", allow_empty=True) if "description" in top else ""

    kind: Literal["rollback", "procedure"] = "rollback" if name.startswith("rollback-") else "procedure"
    if "kind" in top:
        knode = top["kind"][1]
        text = v.scalar_text(knode, "kind")
        if text not in _KINDS:
            v.fail(knode, f"kind: {text!r} is not one of: {', '.join(_KINDS)}")
        kind = "rollback" if text == "rollback" else "procedure"

    drill: str | None = None
    if "drill" in top:
        from cbctl.core.model.rollout import CAPABILITIES

        dnode = top["drill"][1]
        drill = v.scalar_text(dnode, "drill")
        if drill not in CAPABILITIES:
            v.fail(dnode, f"drill: {drill!r} is not a capability (one of: {', '.join(CAPABILITIES)})")

    declared = _build_vars(v, top["vars"][1]) if "vars" in top else {}

    steps_node = top["steps"][1]
    if not isinstance(steps_node, yaml.SequenceNode):
        v.fail(steps_node, f"steps: expected a list, got {_node_kind(steps_node)}")
    if not steps_node.value:
        v.fail(steps_node, "steps: must not be empty")
    steps = tuple(_build_step(v, n, i, declared) for i, n in enumerate(steps_node.value, start=1))
    return Runbook(name=name, summary=summary, kind=kind, steps=steps, vars=declared, description=description,
                   path=v.where, drill=drill)


def _build_vars(v: _Validator, node: yaml.Node) -> dict[str, VarSpec]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return {}
    if not isinstance(node, yaml.MappingNode):
        v.fail(node, f"vars: expected a mapping of NAME: {{required, default, secret}}, got {_node_kind(node)}")
    out: dict[str, VarSpec] = {}
    for knode, vnode in node.value:
        if not isinstance(knode, yaml.ScalarNode) or not _VAR_NAME_RE.match(knode.value):
            v.fail(knode, f"vars: {getattr(knode, 'value', '?')!r} is not a variable name (letters, digits, _)")
        vname = knode.value
        if vname in out:
            v.fail(knode, f"vars: duplicate variable {vname!r}")
        what = f"var {vname!r}"
        line = knode.start_mark.line + 1
        if isinstance(vnode, yaml.ScalarNode) and vnode.tag == "tag:yaml.org,2002:null":
            out[vname] = VarSpec(vname, line=line)
            continue
        spec = v.mapping(vnode, what, _VAR_KEYS)
        required = v.boolean(spec["required"][1], f"{what}: required") if "required" in spec else False
        default = v.scalar_text(spec["default"][1], f"{what}: default") if "default" in spec else None
        secret = v.boolean(spec["secret"][1], f"{what}: secret") if "secret" in spec else False
        desc = v.string(spec["description"][1], f"{what}: description", allow_empty=True) if "description" in spec else ""
        if required and default is not None:
            v.fail(spec["default"][0], f"{what}: a required variable cannot have a default")
        if secret and default is not None:
            v.fail(spec["default"][0], f"{what}: a secret variable cannot have a default (it would live in the file)")
        out[vname] = VarSpec(vname, required=required, default=default, secret=secret, description=desc, line=line)
    return out


def _build_step(v: _Validator, node: yaml.Node, index: int, declared: Mapping[str, VarSpec]) -> Step:
    what = f"step {index}"
    spec = v.mapping(node, what, _STEP_KEYS)
    kinds = [k for k in _STEP_KINDS if k in spec]
    if not kinds:
        v.fail(node, f"{what}: needs one of: {', '.join(_STEP_KINDS)}")
    if len(kinds) > 1:
        v.fail(spec[kinds[1]][0], f"{what}: has both {kinds[0]!r} and {kinds[1]!r}; a step does exactly one thing")
    kind: StepKind = kinds[0]  # type: ignore[assignment]
    line = node.start_mark.line + 1
    confirm = v.string(spec["confirm"][1], f"{what}: confirm") if "confirm" in spec else None
    if confirm is not None:
        v.placeholders(spec["confirm"][1], confirm, f"{what}: confirm", declared)
    description = v.string(spec["description"][1], f"{what}: description", allow_empty=True) if "description" in spec else ""
    body = spec[kind][1]

    if kind == "run":
        text = v.string(body, f"{what}: run")
        try:
            # Split first, substitute later (per element): values never meet a parser.
            argv = shlex.split(text, comments=False, posix=True)
        except ValueError as exc:
            v.fail(body, f"{what}: run: cannot split {text!r}: {exc}")
        if not argv or argv[0] != "cbctl":
            first = argv[0] if argv else ""
            v.fail(body, f"{what}: run: only cbctl commands can be run (got {first!r}); "
                         "use 'argv: [...]' for another program")
        if len(argv) < 2:
            v.fail(body, f"{what}: run: 'cbctl' needs a command")
        for a in argv:
            v.placeholders(body, a, f"{what}: run", declared)
        return Step(index, line, "run", text, argv=tuple(argv), confirm=confirm, description=description)

    if kind == "argv":
        if not isinstance(body, yaml.SequenceNode) or not body.value:
            v.fail(body, f"{what}: argv: expected a non-empty list of strings, got {_node_kind(body)}")
        argv = [v.scalar_text(n, f"{what}: argv[{i}]") for i, n in enumerate(body.value)]
        if _PLACEHOLDER.search(argv[0]) or "{{" in argv[0]:
            v.fail(body.value[0], f"{what}: argv: the program (argv[0]) must be fixed, not a variable")
        for n, a in zip(body.value, argv, strict=True):
            v.placeholders(n, a, f"{what}: argv", declared)
        return Step(index, line, "argv", shlex.join(argv), argv=tuple(argv), confirm=confirm, description=description)

    cspec = v.mapping(body, f"{what}: check", _CHECK_KEYS)
    for required in ("promql", "expect"):
        if required not in cspec:
            v.fail(body, f"{what}: check: missing required key {required!r}")
    promql = v.string(cspec["promql"][1], f"{what}: check.promql")
    v.placeholders(cspec["promql"][1], promql, f"{what}: check.promql", declared)
    enode = cspec["expect"][1]
    etext = v.scalar_text(enode, f"{what}: check.expect")
    try:
        expect = Expectation.parse(etext) if enode.tag == "tag:yaml.org,2002:str" else None
    except ValueError:
        expect = None
    if expect is None:
        v.fail(enode, f"{what}: check.expect: {etext!r} is not a comparison like '== 0', '< 5' or '>= 0.99'")
    within = v.duration(cspec["within"][1], f"{what}: check.within") if "within" in cspec else 0.0
    interval = v.duration(cspec["interval"][1], f"{what}: check.interval") if "interval" in cspec else DEFAULT_INTERVAL
    if within:
        interval = min(interval, within)
    source = f"{promql} {expect.text}" + (f" within {within:g}s" if within else "")
    return Step(index, line, "check", source, check=CheckSpec(promql, expect, within, interval), confirm=confirm,
                description=description)


def load_runbook(path: str | os.PathLike[str]) -> Runbook:
    """Read and validate one runbook file. Raises :class:`RunbookError` (``FILE:LINE: reason``)."""
    p = Path(path)
    where = display_path(p)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise RunbookError(where, None, "no such file") from None
    except OSError as exc:
        raise RunbookError(where, None, f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise RunbookError(where, None, f"larger than {MAX_BYTES} bytes; not a runbook")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RunbookError(where, line, "not UTF-8") from None
    return parse_runbook(text, where=where, expected_name=p.name.removesuffix(".yaml"))


def default_runbooks_dir() -> Path:
    """``$CBCTL_RUNBOOKS_DIR``, else the project's ``runbooks/`` next to the ``cbctl`` package."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "runbooks"


def runbook_files(directory: str | os.PathLike[str]) -> list[Path]:
    """``*.yaml`` files of ``directory``, sorted. Raises ``NotFound`` when it does not exist."""
    d = Path(directory)
    if not d.is_dir():
        raise NotFound(f"runbooks directory {display_path(d)} does not exist (set --dir or {ENV_DIR})")
    return sorted(p for p in d.glob("*.yaml") if p.is_file())


def load_all(directory: str | os.PathLike[str]) -> tuple[list[Runbook], list[RunbookError]]:
    """Every runbook of ``directory``: the valid ones, and one error per invalid file."""
    good: list[Runbook] = []
    bad: list[RunbookError] = []
    for p in runbook_files(directory):
        try:
            good.append(load_runbook(p))
        except RunbookError as exc:
            bad.append(exc)
    return good, bad


def find_runbook(directory: str | os.PathLike[str], name: str) -> Runbook:
    """The runbook called ``name`` in ``directory`` — or, when ``name`` ends in ``.yaml`` or
    contains a path separator, that file. Raises ``NotFound`` naming the known runbooks."""
    if name.endswith(".yaml") or os.sep in name or "/" in name:
        return load_runbook(name)
    if not _NAME_RE.match(name):
        raise NotFound(f"no runbook {name!r}")
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in runbook_files(directory)) or "none"
        raise NotFound(f"no runbook {name!r} in {display_path(Path(directory))} (known: {known})")
    return load_runbook(path)


# -- variables -------------------------------------------------------------------------------


def parse_var_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> dict. The value is everything after the first ``=``, verbatim."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _VAR_NAME_RE.match(name):
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
                   prefix: Sequence[str] = ("cbctl",), extra: Sequence[str] = (), resumes: str | None = None) -> str:
    """The command that resumes ``runbook`` at ``from_step`` with the same variables.

    ``prefix`` carries global options (``cbctl --context prod``), ``extra`` options such as
    ``--dir``; ``resumes`` is the id of the stopped run (``--resumes RUN``), which links the two
    runs into one chain. Secret values appear as ``<secret>``: they are never printed.
    """
    argv = [*prefix, "runbook", "run", runbook.name, "--from-step", str(from_step)]
    if resumes:
        argv += ["--resumes", resumes]
    argv += [*extra]
    for name, value in masked(runbook, values).items():
        argv += ["--var", f"{name}={value}"]
    return shlex.join(argv)


# -- run records -----------------------------------------------------------------------------


@dataclass
class StepOutcome:
    """What happened to one step. ``status``: ``ok`` | ``failed`` | ``declined`` |
    ``interrupted`` | ``skipped`` (before ``--from-step``) | ``not-run`` (after a stop)."""

    index: int
    kind: str
    text: str
    status: str
    exit_code: int | None = None
    seconds: float = 0.0
    detail: str = ""
    # Store revisions of the run record saved just before and just after the step: every write
    # the step made (its audit entries) has a revision strictly between them. None when the
    # record could not be written (then the step's writes cannot be attributed).
    revisions: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "text": self.text, "status": self.status,
                "exit_code": self.exit_code, "seconds": round(self.seconds, 3), "detail": self.detail,
                "revisions": self.revisions}


@dataclass
class RunRecord:
    """A run as stored at ``keys.runbook_run(cluster, run_id)`` (JSON, see :meth:`to_json`).

    ``status`` is ``running`` while the run is in progress (a crashed run stays so), then
    ``completed`` | ``failed`` | ``aborted`` (declined at a prompt) | ``interrupted`` (SIGINT or
    SIGTERM: ``interrupted_by`` names it). Times are Unix seconds. ``vars`` holds values, secrets
    as ``<secret>``. ``resume`` is the command to continue a run that did not complete (None
    when completed); ``resumes`` the run this one continues. ``overrides``: for a run that
    stopped, the rollback overrides in force when it stopped (each with ``by_this_run`` and the
    command that lifts it); None when not looked at.
    """

    run_id: str
    runbook: str
    kind: str
    actor: str
    started_at: float
    from_step: int
    vars: dict[str, str]
    steps: list[StepOutcome]
    finished_at: float | None = None
    status: RunStatus = "running"
    resume: str | None = None
    cluster: str | None = None
    drill: str | None = None
    runbook_sha256: str = ""
    resumes: str | None = None
    interrupted_by: str | None = None
    overrides: list[dict[str, Any]] | None = None
    record_error: str | None = None  # not stored: set when the store could not be written

    @property
    def failed_step(self) -> StepOutcome | None:
        return next((s for s in self.steps if s.status in ("failed", "declined", "interrupted")), None)

    @property
    def done_steps(self) -> list[StepOutcome]:
        return [s for s in self.steps if s.status == "ok"]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "runbook": self.runbook,
            "kind": self.kind,
            "actor": self.actor,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "from_step": self.from_step,
            "steps": [s.to_json() for s in self.steps],
            "vars": dict(self.vars),
            "resume": self.resume,
            "cluster": self.cluster,
            "drill": self.drill,
            "runbook_sha256": self.runbook_sha256,
            "resumes": self.resumes,
            "interrupted_by": self.interrupted_by,
            "overrides": self.overrides,
        }


def new_run_id(runbook_name: str, now: float | None = None) -> str:
    """``20250102T030405Z-<runbook>-<6 hex>``: keys sort by start time, and never collide."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{runbook_name}-{secrets.token_hex(3)}"


async def save_run(coord: Coordinator, cluster: str, record: RunRecord | Mapping[str, Any]) -> int:
    """Put the run record (unconditional: one writer per run id). Returns the store revision."""
    data = record.to_json() if isinstance(record, RunRecord) else dict(record)
    return await coord.put(keys.runbook_run(cluster, data["run_id"]),
                           json.dumps(data, sort_keys=True).encode("utf-8"))


async def list_runs(coord: Coordinator, cluster: str) -> list[dict[str, Any]]:
    """Every stored run record, oldest first. Undecodable records are skipped (and logged)."""
    out: list[dict[str, Any]] = []
    for kv in await coord.list(keys.runbooks_prefix(cluster)):
        try:
            data = kv.json()
        except (UnicodeDecodeError, ValueError):
            log.warning("skipping undecodable run record %s", kv.key)
            continue
        if isinstance(data, dict) and "runbook" in data:
            out.append(data)
    return out


async def get_run(coord: Coordinator, cluster: str, run_id: str) -> dict[str, Any] | None:
    """One stored run record, or None. Raises ``BackendUnavailable``."""
    kv = await coord.get(keys.runbook_run(cluster, run_id))
    if kv is None:
        return None
    try:
        data = kv.json()
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stopped_step(record: Mapping[str, Any]) -> int | None:
    """Index of the step a stopped run record stopped at (failed, declined or interrupted)."""
    for s in record.get("steps") or ():
        if isinstance(s, Mapping) and s.get("status") in ("failed", "declined", "interrupted"):
            idx = s.get("index")
            return idx if isinstance(idx, int) else None
    return None


def check_resumable(record: Mapping[str, Any] | None, runbook: Runbook, run_id: str, from_step: int) -> None:
    """``--resumes RUN --from-step N`` must continue a stopped run of the same runbook file, at
    or before the step it stopped at. Raises ``BadInput`` (exit 2) saying which rule broke."""
    if record is None:
        raise BadInput(f"--resumes {run_id}: no such run recorded in this cluster")
    if record.get("runbook") != runbook.name:
        raise BadInput(f"--resumes {run_id}: that is a run of {record.get('runbook')!r}, not {runbook.name!r}")
    if record.get("status") not in STOPPED:
        raise BadInput(f"--resumes {run_id}: that run is {record.get('status')!r}; only a run that stopped "
                       f"({', '.join(STOPPED)}) can be resumed")
    if record.get("runbook_sha256") != runbook.sha256:
        raise BadInput(f"--resumes {run_id}: {runbook.path} changed since that run; start it again from step 1")
    stop = stopped_step(record)
    if stop is None or from_step > stop:
        raise BadInput(f"--resumes {run_id}: that run stopped at step {stop}; --from-step must be at most {stop}")


# -- executor --------------------------------------------------------------------------------


def run_external(argv: Sequence[str]) -> int:
    """Run a program directly — no shell — inheriting stdio. 127 when it cannot be started."""
    try:
        return subprocess.run(list(argv), check=False).returncode
    except OSError as exc:
        log.error("cannot run %s: %s", argv[0], exc.strerror)
        return 127


@dataclass
class RunbookExecutor:
    """Runs a validated runbook's steps in order and stops at the first that fails.

    Contract:

    * ``run_cbctl(argv) -> exit code`` runs ``cbctl`` in-process (argv[0] is ``"cbctl"``);
      ``run_external(argv)`` runs any other ``argv`` step, with no shell;
      ``query(promql) -> values`` evaluates an instant query (raising ``CbctlError``, e.g.
      ``BackendUnavailable``, when it cannot); needed only by runbooks with checks.
    * ``confirm(question) -> bool`` is asked before every run/argv step, and before a check
      that has a ``confirm:``; ``None`` means ``--yes`` (never ask). A "no" aborts the run.
    * ``announce(message)`` receives progress lines (the CLI prints them to stderr).
    * ``record(json) -> store revision | None`` is called at start (status ``running``), after
      each step and at the end; a ``CbctlError`` from it at start propagates (nothing has run);
      later it is remembered in ``RunRecord.record_error`` and the run goes on — a rollback must
      not stop half-way because the bookkeeping failed. The revisions it returns bracket each
      step (``StepOutcome.revisions``).
    * ``interrupted() -> reason | None`` says whether SIGINT/SIGTERM arrived (the CLI's signal
      handler sets it). It is asked before and after every step: a step that returns after an
      interrupt (its exit code is whatever the interrupted command made of it) is
      ``interrupted``, not ``failed``. A ``KeyboardInterrupt`` raised during a step means the
      same. Either way the run ends ``interrupted`` (recorded, never re-raised).
    * ``overrides() -> list`` is asked once when a run stops (failed, aborted or interrupted),
      before the final record: the rollback overrides left in force. A ``CbctlError`` from it is
      noted in the record, not raised.
    * Steps before ``from_step`` are ``skipped``, not run. ``resumes`` is the stopped run this
      one continues (checked by the caller, see :func:`check_resumable`).
    """

    runbook: Runbook
    values: Mapping[str, str]
    run_cbctl: Callable[[Sequence[str]], int]
    query: Callable[[str], Sequence[float]] | None = None
    run_external: Callable[[Sequence[str]], int] = run_external
    confirm: Callable[[str], bool] | None = None
    announce: Callable[[str], None] = lambda message: None
    record: Callable[[dict[str, Any]], int | None] | None = None
    interrupted: Callable[[], str | None] = lambda: None
    overrides: Callable[[RunRecord], list[dict[str, Any]]] | None = None
    from_step: int = 1
    run_id: str | None = None
    actor: str | None = None
    cluster: str | None = None
    resumes: str | None = None
    resume_prefix: Sequence[str] = ("cbctl",)
    resume_extra: Sequence[str] = ()
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        n = len(self.runbook.steps)
        if not 1 <= self.from_step <= n:
            raise BadInput(f"--from-step {self.from_step}: runbook {self.runbook.name!r} has steps 1..{n}")

    def _text(self, step: Step) -> str:
        # Shown and stored: secrets masked.
        return step.render_text(masked(self.runbook, self.values))

    def execute(self) -> RunRecord:
        """Run the steps; return the final record (also handed to ``record``)."""
        from cbctl.core.model.audit import current_actor

        rb = self.runbook
        rec = RunRecord(
            run_id=self.run_id or new_run_id(rb.name, self.clock()),
            runbook=rb.name,
            kind=rb.kind,
            actor=self.actor or current_actor(),
            started_at=self.clock(),
            from_step=self.from_step,
            vars=masked(rb, self.values),
            steps=[StepOutcome(s.index, s.kind, self._text(s), "skipped" if s.index < self.from_step else "not-run")
                   for s in rb.steps],
            cluster=self.cluster,
            drill=rb.drill,
            runbook_sha256=rb.sha256,
            resumes=self.resumes,
        )
        last: int | None = None
        if self.record is not None:
            last = self.record(rec.to_json())  # at start: a failure here propagates, nothing has run

        total = len(rb.steps)
        stop_status: RunStatus | None = None
        for step in rb.steps[self.from_step - 1:]:
            outcome = rec.steps[step.index - 1]
            reason = self.interrupted()
            if reason is not None:  # arrived between steps (while the record was written)
                outcome.status, outcome.detail = "interrupted", f"interrupted by {reason} before it started"
                rec.interrupted_by, stop_status = reason, "interrupted"
                break
            self.announce(f"step {step.index}/{total} [{step.kind}] {outcome.text}")
            if step.description:
                self.announce(f"  {step.description}")
            started = self.monotonic()
            try:
                question = step.render_confirm(self.values)
                if question is None and step.kind != "check":
                    question = f"Run step {step.index}/{total}?"
                if self.confirm is not None and question is not None and not self.confirm(question):
                    outcome.status = "declined"
                    outcome.detail = "declined at the confirmation prompt"
                    stop_status = "aborted"
                else:
                    self._run_step(step, outcome)
                    if outcome.status == "failed":
                        stop_status = "failed"
            except KeyboardInterrupt:
                outcome.status = "interrupted"
            outcome.seconds = self.monotonic() - started
            reason = self.interrupted()
            if outcome.status == "interrupted" or (reason is not None and outcome.status != "ok"):
                # The command saw the signal and gave up (its exit code says how): interrupted.
                reason = reason or "SIGINT"
                outcome.status = "interrupted"
                outcome.detail = f"interrupted by {reason}" + (f" (exit code {outcome.exit_code})"
                                                               if outcome.exit_code is not None else "")
                rec.interrupted_by, stop_status = reason, "interrupted"
            elif reason is not None and step.index < total:
                # The step finished before the signal was acted on: the next one is where the
                # run stopped (after the last step there is nothing left: the run completed).
                after = rec.steps[step.index]
                after.status, after.detail = "interrupted", f"interrupted by {reason} before it started"
                rec.interrupted_by, stop_status = reason, "interrupted"
            saved = self._save(rec)
            if last is not None and saved is not None:
                outcome.revisions = [last, saved]
            last = saved
            if stop_status is not None:
                break

        rec.finished_at = self.clock()
        if stop_status is None:
            rec.status = "completed"
        else:
            rec.status = stop_status
            at = rec.failed_step
            rec.resume = None if at is None else resume_command(
                rb, self.values, at.index, prefix=self.resume_prefix, extra=self.resume_extra, resumes=rec.run_id)
            if self.overrides is not None:
                try:
                    rec.overrides = self.overrides(rec)
                except CbctlError as exc:
                    self.announce(f"warning: could not read the rollback overrides in force: {exc}")
        self._save(rec)
        return rec

    def _save(self, rec: RunRecord) -> int | None:
        if self.record is None:
            return None
        try:
            return self.record(rec.to_json())
        except CbctlError as exc:
            rec.record_error = str(exc)
            self.announce(f"warning: could not record the run: {exc}")
            return None

    def _run_step(self, step: Step, outcome: StepOutcome) -> None:
        if step.check is not None:
            self._run_check(step.check, outcome)
            return
        argv = step.render_argv(self.values)
        code = self.run_cbctl(argv) if step.in_process else self.run_external(argv)
        outcome.exit_code = code
        outcome.status = "ok" if code == 0 else "failed"
        if code != 0:
            outcome.detail = f"exit code {code}"

    def _run_check(self, check: CheckSpec, outcome: StepOutcome) -> None:
        if self.query is None:
            raise BadInput(f"runbook {self.runbook.name!r} has checks but no Prometheus query function was given")
        promql = _substitute(check.promql, self.values)
        deadline = self.monotonic() + check.within
        last = "no answer"
        while True:
            if self.interrupted() is not None:  # a signal between two polls: stop polling now
                raise KeyboardInterrupt
            try:
                values = list(self.query(promql))
            except BadInput as exc:
                # A malformed query does not get better by waiting.
                outcome.status, outcome.exit_code, outcome.detail = "failed", exc.exit_code, str(exc)
                return
            except CbctlError as exc:
                last = f"error: {exc}"
                code = exc.exit_code
            else:
                if values and all(check.expect.holds(x) for x in values):
                    outcome.status, outcome.exit_code = "ok", 0
                    outcome.detail = f"{_fmt_values(values)} {check.expect.text}"
                    return
                last = "no data" if not values else f"last value {_fmt_values(values)}"
                code = 1
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                within = f" within {check.within:g}s" if check.within else ""
                outcome.status, outcome.exit_code = "failed", code
                outcome.detail = f"{promql} {check.expect.text} did not hold{within} ({last})"
                if code == BackendUnavailable.exit_code:
                    outcome.detail += "; Prometheus unreachable"
                return
            self.sleep(min(check.interval, remaining))


def _fmt_values(values: Sequence[float]) -> str:
    return ", ".join(f"{x:g}" for x in values)
