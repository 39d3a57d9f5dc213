"""The rollout follower: watches the cluster's rollout document and applies each revision
without restart, all or nothing (see docs/agent.md).

Contract: a revision is handed to every flags listener first; one that raises refuses it, the
listeners already told get the running flags back, and the refused revision is logged once,
reported by ``/readyz`` and skipped until a newer one arrives.  A deleted document means stage 0
(everything off), also when the delete is only found on a resync.  The applied revision is
written into the node's record (``applied_revision``), which ``stage advance --wait`` waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cbctl.core.agent.hooks import FlagsListener
from cbctl.core.agent.tasks import LOOP_BACKOFF
from cbctl.core.backends.retry import Backoff
from cbctl.core.model import keys
from cbctl.core.model.config import Context
from cbctl.core.model.errors import BackendUnavailable, BadInput, CbctlError
from cbctl.core.model.metrics import AgentMetrics
from cbctl.core.model.rollout import RolloutDocument, initial_document

if TYPE_CHECKING:
    from cbctl.core.backends.coord.base import Coordinator

log = logging.getLogger(__name__)

__all__ = ["RolloutFollower"]


class RolloutFollower:
    """The rollout-following part of :class:`~cbctl.core.agent.node.NodeAgent` (a mixin).

    Uses the attributes below, set by the agent, and the agent's ``_enter_mode`` (lane mode
    switch) and ``_write_record`` (report the applied revision).
    """

    ctx: Context
    node_id: str
    metrics: AgentMetrics
    coordinator: Coordinator
    cluster_enabled: bool
    _flags: dict[str, Any]
    _applied_revision: int
    _flags_applied: bool
    _apply_error: str | None
    _refused_revision: int
    _doc_deleted: bool
    _flag_listeners: list[FlagsListener]
    _wake: asyncio.Event
    _stopping: bool

    def _parse(self, value: bytes | None, revision: int) -> tuple[RolloutDocument | None, int]:
        if value is None:
            return initial_document(), revision
        try:
            return RolloutDocument.from_json(value), revision
        except BadInput as exc:
            self._apply_error = f"revision {revision}: {exc}"
            log.error("agent %s cannot apply rollout revision %d: %s", self.node_id, revision, exc)
            return None, revision

    async def _rollout_loop(self, watch_from: int) -> None:
        """Follow the rollout document; apply each revision; resync after store trouble."""
        key = keys.rollout(self.ctx.cluster)
        backoff = Backoff(LOOP_BACKOFF)
        resync = False
        while not self._stopping:
            try:
                if resync:
                    start_rev = await self.coordinator.current_revision()
                    kv = await self.coordinator.get(key)
                    if kv is not None:
                        await self._apply(kv.value, kv.mod_revision)
                    elif not self._doc_deleted and (self._applied_revision or self._refused_revision):
                        # Deleted while we were not watching: the delete event is gone, but a
                        # missing document means stage 0 (everything off), as in the watch.
                        await self._apply(None, start_rev)
                    watch_from = max(start_rev, kv.mod_revision if kv else 0) + 1
                    resync = False
                async for ev in self.coordinator.watch(key, start_revision=watch_from):
                    backoff.reset()
                    watch_from = ev.revision + 1
                    await self._apply(ev.value if ev.kind == "put" else None, ev.revision)
            except CbctlError as exc:  # unreachable store, compacted history: re-read, re-watch
                if self._stopping:
                    return
                delay = backoff.next_delay()
                log.warning("rollout watch of %s interrupted (%s); re-reading in %.1fs", self.node_id, exc, delay)
                resync = True
                await asyncio.sleep(delay)

    async def _apply(self, value: bytes | None, revision: int) -> None:
        """Apply one rollout revision, all or nothing, and report it in the record.

        ``value`` None is a deleted document: stage 0 flags.  Order: parse; hand the new flags
        to every listener (they may refuse: then the ones already told are given the running
        flags back and nothing else changed); only then switch this agent's own state and mode.
        A refused revision is logged once and skipped until a newer revision arrives.
        """
        if revision == self._refused_revision:
            return
        if revision < self._applied_revision or (revision == self._applied_revision and self._flags_applied):
            return
        doc, _ = self._parse(value, revision)
        if doc is None:
            self._refused_revision = revision
            return
        new_flags = dict(doc.flags)
        if not await self._notify_flags(new_flags, revision):
            self._refused_revision = revision
            return
        was_enabled = self.cluster_enabled
        self._flags = new_flags
        self._doc_deleted = value is None
        if self.cluster_enabled != was_enabled:
            await self._enter_mode(self.cluster_enabled)
        self._applied_revision = revision
        self._refused_revision = 0
        self._flags_applied = True
        self._apply_error = None
        self.metrics.applied_revision.set(revision)
        self._wake.set()
        log.info("agent %s applied rollout revision %d (stage %d%s)", self.node_id, revision, doc.stage,
                 ", document deleted" if value is None else "")
        try:
            await self._write_record()
        except BackendUnavailable as exc:
            log.warning("agent %s could not report revision %d yet: %s", self.node_id, revision, exc)

    async def _notify_flags(self, flags: Mapping[str, Any], revision: int) -> bool:
        """Hand ``flags`` to every listener; False (and listeners rolled back) if one refused.

        A listener refuses by raising.  The listeners that had already taken the new flags get
        the running ones again, so no subsystem is left half on the refused revision.
        """
        told = 0
        try:
            for listener in self._flag_listeners:
                await listener(dict(flags), revision)
                told += 1
        except Exception as exc:  # any refusal, also a listener's bug: the revision is not applied
            self._apply_error = f"revision {revision}: {exc}"
            log.error("agent %s refused rollout revision %d (%s); keeping revision %d until a newer one arrives",
                      self.node_id, revision, exc, self._applied_revision, exc_info=not isinstance(exc, CbctlError))
            for listener in self._flag_listeners[:told + 1]:
                try:
                    await listener(dict(self._flags), self._applied_revision)
                except Exception as back:  # noqa: BLE001 - logged; the refusal stands either way
                    log.error("agent %s: restoring revision %d in a flags listener failed: %s",
                              self.node_id, self._applied_revision, back)
            return False
        return True
