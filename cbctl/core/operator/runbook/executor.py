"""The runbook executor: runs a validated runbook's steps in order, stops at the first that
fails, and records the run through callables it is given (no typer/rich, no printing)."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cbctl.core.model.audit import current_actor
from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError
from cbctl.core.model.records import RunRecord, RunStatus, StepOutcome
from cbctl.core.operator.runbook.model import (
    CheckSpec,
    Runbook,
    Step,
    masked,
    resume_command,
    substitute,
)
from cbctl.core.operator.runbook.store import new_run_id

log = logging.getLogger(__name__)


def run_external(argv: Sequence[str]) -> int:
    """Run a program directly — no shell — inheriting stdio. 127 when it cannot be started."""
    try:
        return subprocess.run(list(argv), check=False).returncode
    except OSError as exc:
        log.error("cannot run %s: %s", argv[0], exc.strerror)
        return 127


@dataclass(frozen=True)
class CheckPoll:
    """One poll of a runbook ``check:`` that did not hold yet (what ``check_progress`` is told).

    ``state``: what was seen (``no data``, ``last value 2``, ``error: ...``), free of times, so
    equal observations give equal text; ``remaining``: seconds until the check gives up.
    """

    step: int
    total: int
    expect: str
    state: str
    remaining: float
    polls: int

    def line(self) -> str:
        """``step 3/5 check: last value 2, want == 0; 48s left``."""
        return f"step {self.step}/{self.total} check: {self.state}, want {self.expect}; {max(self.remaining, 0):.0f}s left"


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
    * ``check_progress(poll)`` is told after every poll of a ``check:`` that did not hold yet
      and will be polled again (:class:`CheckPoll`); the CLI shows a live line or one line per
      change.
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
    check_progress: Callable[[CheckPoll], None] | None = None
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
    resume_target: str | None = None  # the runbook's path when it was given by path
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
                rb, self.values, at.index, prefix=self.resume_prefix, extra=self.resume_extra, resumes=rec.run_id,
                target=self.resume_target)
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
            self._run_check(step.check, outcome, step.index)
            return
        argv = step.render_argv(self.values)
        code = self.run_cbctl(argv) if step.in_process else self.run_external(argv)
        outcome.exit_code = code
        outcome.status = "ok" if code == 0 else "failed"
        if code != 0:
            outcome.detail = f"exit code {code}"

    def _run_check(self, check: CheckSpec, outcome: StepOutcome, index: int = 0) -> None:
        if self.query is None:
            raise BadInput(f"runbook {self.runbook.name!r} has checks but no Prometheus query function was given")
        promql = substitute(check.promql, self.values)
        deadline = self.monotonic() + check.within
        last = "no answer"
        polls = 0
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
            polls += 1
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                within = f" within {check.within:g}s" if check.within else ""
                outcome.status, outcome.exit_code = "failed", code
                outcome.detail = f"{promql} {check.expect.text} did not hold{within} ({last})"
                if code == BackendUnavailable.exit_code:
                    outcome.detail += "; Prometheus unreachable"
                return
            if self.check_progress is not None:
                self.check_progress(CheckPoll(index, len(self.runbook.steps), check.expect.text, last, remaining, polls))
            self.sleep(min(check.interval, remaining))


def _fmt_values(values: Sequence[float]) -> str:
    return ", ".join(f"{x:g}" for x in values)
