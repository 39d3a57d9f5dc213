"""Loading and validating runbook files (``runbooks/*.yaml``; format in docs/operator.md).

Every error is a :class:`~cbctl.core.operator.runbook.model.RunbookError` naming the file and
1-based line (``runbooks/x.yaml:7: step 2: unknown key 'rn'``). Validation goes on past a
problem: every field, variable and step is checked, and all problems are raised together
(:class:`~cbctl.core.operator.runbook.model.RunbookErrors`); only YAML that does not parse, or a
file that is not a mapping, stops at once.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, TypeVar

import yaml

from cbctl.core.model.errors import BadInput, NotFound
from cbctl.core.operator.runbook.model import (
    PLACEHOLDER,
    VAR_NAME_RE,
    CheckSpec,
    Expectation,
    Runbook,
    RunbookError,
    Step,
    raise_all,
    StepKind,
    VarSpec,
)

T = TypeVar("T")

ENV_DIR: Final = "CBCTL_RUNBOOKS_DIR"
DEFAULT_INTERVAL: Final = 5.0
MAX_BYTES: Final = 1024 * 1024

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_TOP_KEYS: Final = ("name", "summary", "description", "kind", "drill", "vars", "steps")
_STEP_KINDS: Final = ("run", "argv", "check")
_STEP_KEYS: Final = (*_STEP_KINDS, "confirm", "description")
_CHECK_KEYS: Final = ("promql", "expect", "within", "interval")
_VAR_KEYS: Final = ("required", "default", "secret", "description")
_KINDS: Final = ("rollback", "procedure")


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
        self.errors: list[RunbookError] = []

    def fail(self, node: yaml.Node, reason: str) -> NoReturn:
        raise RunbookError(self.where, node.start_mark.line + 1, reason)

    def note(self, node: yaml.Node, reason: str) -> None:
        """A problem that does not stop validation (reported with the others at the end)."""
        self.errors.append(RunbookError(self.where, node.start_mark.line + 1, reason))

    def attempt(self, fn: Callable[..., T], *args: Any, default: T | None = None) -> T | None:
        """``fn(*args)``; a :class:`RunbookError` is recorded and ``default`` returned, so the
        next field, variable or step is still checked."""
        try:
            return fn(*args)
        except RunbookError as exc:
            self.errors.append(exc)
            return default

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
                self.note(knode, f"{what}: unknown key {key!r} (expected one of: {', '.join(allowed)})")
                continue
            if key in out:
                self.note(knode, f"{what}: duplicate key {key!r} (first on line {out[key][0].start_mark.line + 1})")
                continue
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
        for m in PLACEHOLDER.finditer(text):
            if m.group(1) not in declared:
                known = ", ".join(sorted(declared)) or "none"
                self.fail(node, f"{what}: unknown variable {m.group(1)!r} (declared: {known})")
        rest = PLACEHOLDER.sub("", text)
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

    Raises :class:`RunbookError` (``where:line: reason``), or ``RunbookErrors`` with every
    problem found when there are several.
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
        v = _Validator(where, loader)
        try:
            rb = _build(v, root, expected_name)
        except RunbookError as exc:  # a problem nothing after it can be checked past
            v.errors.append(exc)
        raise_all(v.errors)
        return replace(rb, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
    finally:
        loader.dispose()


def _build(v: _Validator, root: yaml.Node, expected_name: str | None) -> Runbook:
    top = v.mapping(root, "runbook", _TOP_KEYS)
    for required in ("name", "summary", "steps"):
        if required not in top:
            v.note(root, f"missing required key {required!r}")

    def check_name() -> str:
        name_node = top["name"][1]
        name = v.string(name_node, "name")
        if not NAME_RE.match(name):
            v.fail(name_node, f"name {name!r}: use lowercase letters, digits and '-'")
        if expected_name is not None and name != expected_name:
            v.fail(name_node, f"name {name!r} does not match the file name {expected_name + '.yaml'!r}")
        return name

    name = (v.attempt(check_name) if "name" in top else None) or ""
    summary = (v.attempt(v.string, top["summary"][1], "summary") if "summary" in top else None) or ""
    description = (v.attempt(lambda: v.string(top["description"][1], "description", allow_empty=True)) if "description" in top else None) or ""

    kind: Literal["rollback", "procedure"] = "rollback" if name.startswith("rollback-") else "procedure"

    def check_kind() -> Literal["rollback", "procedure"]:
        knode = top["kind"][1]
        text = v.scalar_text(knode, "kind")
        if text not in _KINDS:
            v.fail(knode, f"kind: {text!r} is not one of: {', '.join(_KINDS)}")
        return "rollback" if text == "rollback" else "procedure"

    if "kind" in top:
        kind = v.attempt(check_kind) or kind

    def check_drill() -> str:
        from cbctl.core.model.stages import CAPABILITIES

        dnode = top["drill"][1]
        text = v.scalar_text(dnode, "drill")
        if text not in CAPABILITIES:
            v.fail(dnode, f"drill: {text!r} is not a capability (one of: {', '.join(CAPABILITIES)})")
        return text

    drill: str | None = v.attempt(check_drill) if "drill" in top else None

    declared = (v.attempt(_build_vars, v, top["vars"][1]) if "vars" in top else None) or {}

    steps: tuple[Step, ...] = ()
    if "steps" in top:
        steps_node = top["steps"][1]
        if not isinstance(steps_node, yaml.SequenceNode):
            v.fail(steps_node, f"steps: expected a list, got {_node_kind(steps_node)}")
        if not steps_node.value:
            v.fail(steps_node, "steps: must not be empty")
        built = [v.attempt(_build_step, v, n, i, declared) for i, n in enumerate(steps_node.value, start=1)]
        steps = tuple(s for s in built if s is not None)
    return Runbook(name=name, summary=summary, kind=kind, steps=steps, vars=declared, description=description,
                   path=v.where, drill=drill)


def _build_vars(v: _Validator, node: yaml.Node) -> dict[str, VarSpec]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return {}
    if not isinstance(node, yaml.MappingNode):
        v.fail(node, f"vars: expected a mapping of NAME: {{required, default, secret}}, got {_node_kind(node)}")
    out: dict[str, VarSpec] = {}
    for knode, vnode in node.value:
        if not isinstance(knode, yaml.ScalarNode) or not VAR_NAME_RE.match(knode.value):
            v.note(knode, f"vars: {getattr(knode, 'value', '?')!r} is not a variable name (letters, digits, _)")
            continue
        vname = knode.value
        if vname in out:
            v.note(knode, f"vars: duplicate variable {vname!r}")
            continue
        what = f"var {vname!r}"
        line = knode.start_mark.line + 1
        if isinstance(vnode, yaml.ScalarNode) and vnode.tag == "tag:yaml.org,2002:null":
            out[vname] = VarSpec(vname, line=line)
            continue
        built = v.attempt(_build_var, v, vname, what, line, vnode)
        out[vname] = built if built is not None else VarSpec(vname, line=line)  # declared, so steps may use it
    return out


def _build_var(v: _Validator, vname: str, what: str, line: int, vnode: yaml.Node) -> VarSpec:
    """One variable's spec (``required``, ``default``, ``secret``, ``description``)."""
    spec = v.mapping(vnode, what, _VAR_KEYS)
    required = v.boolean(spec["required"][1], f"{what}: required") if "required" in spec else False
    default = v.scalar_text(spec["default"][1], f"{what}: default") if "default" in spec else None
    secret = v.boolean(spec["secret"][1], f"{what}: secret") if "secret" in spec else False
    desc = v.string(spec["description"][1], f"{what}: description", allow_empty=True) if "description" in spec else ""
    if required and default is not None:
        v.fail(spec["default"][0], f"{what}: a required variable cannot have a default")
    if secret and default is not None:
        v.fail(spec["default"][0], f"{what}: a secret variable cannot have a default (it would live in the file)")
    return VarSpec(vname, required=required, default=default, secret=secret, description=desc, line=line)


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
        if PLACEHOLDER.search(argv[0]) or "{{" in argv[0]:
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
    """``$CBCTL_RUNBOOKS_DIR``, else the runbooks shipped inside the package (``cbctl/runbooks/``).

    The shipped directory is found through :mod:`importlib.resources`, so it is the same for a
    source checkout, an editable install and an installed wheel (package data, pyproject.toml).
    """
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    shipped = importlib.resources.files("cbctl").joinpath("runbooks")
    # A package installed on a file system (wheel, editable, checkout) yields a real Path; the
    # loader of a zipped package would not, and the YAML files are then not readable as files.
    return shipped if isinstance(shipped, Path) else Path(str(shipped))



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
    if not NAME_RE.match(name):
        raise NotFound(f"no runbook {name!r}")
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in runbook_files(directory)) or "none"
        raise NotFound(f"no runbook {name!r} in {display_path(Path(directory))} (known: {known})")
    return load_runbook(path)

