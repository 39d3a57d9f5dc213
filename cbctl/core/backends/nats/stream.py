"""The JetStream stream of one cluster's canonical events (``cb.<cluster>.events.>``).

:func:`ensure_stream` creates it from :class:`~cbctl.core.model.config.StreamConfig` when missing
and otherwise only verifies it (mismatches in :class:`StreamStatus.mismatches`, never changed);
:func:`verify_stream` only verifies.  Errors: JetStream unavailable -> ``BackendUnavailable``;
stream refused by the server -> ``CheckFailed``; missing in ``verify_stream`` -> ``NotFound``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.api as jsapi
import nats.js.errors
from nats.js import JetStreamContext

from cbctl.core.model.config import StreamConfig
from cbctl.core.model.errors import BackendUnavailable, CheckFailed, NotFound
from cbctl.core.model.events import stream_subjects

# JetStream not answering (not enabled, not reachable right now).  TimeoutError covers
# nats.errors.TimeoutError and asyncio's.
_UNAVAILABLE = (TimeoutError, nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError)

# The server keeps nanoseconds; anything closer than this is the same window.
_WINDOW_TOLERANCE = 0.001

#: JetStream's de-duplication header: the publisher sets it to the event id, the bridge reads it.
MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """Result of :func:`ensure_stream` / :func:`verify_stream`."""

    name: str
    created: bool
    mismatches: tuple[str, ...]
    messages: int = 0

    @property
    def ok(self) -> bool:
        """True when the stream exists exactly as configured."""
        return not self.mismatches


def desired_config(cfg: StreamConfig, *, cluster: str) -> jsapi.StreamConfig:
    """The nats-py stream config for ``cfg``, capturing ``cluster``'s subjects."""
    return jsapi.StreamConfig(
        name=cfg.name,
        subjects=[stream_subjects(cluster)],
        storage=jsapi.StorageType.FILE if cfg.storage == "file" else jsapi.StorageType.MEMORY,
        num_replicas=cfg.replicas,
        duplicate_window=cfg.duplicate_window,
        # The limits bound the stream's disk use; past any of them JetStream discards the
        # oldest messages (DiscardPolicy.OLD, the default), so publishing never stalls on them.
        max_age=cfg.max_age,
        max_bytes=cfg.max_bytes,
        max_msgs_per_subject=cfg.max_msgs_per_subject,
    )


def stream_mismatches(actual: jsapi.StreamConfig, cfg: StreamConfig, *, cluster: str) -> list[str]:
    """Human-readable differences between an existing stream's config and ``cfg`` (pure).
    ``cluster``: whose subjects (``cb.<cluster>.events.>``) the stream must capture."""
    out: list[str] = []
    subjects = list(actual.subjects or [])
    want_subjects = stream_subjects(cluster)
    if want_subjects not in subjects:
        out.append(f"subjects {subjects} are not {want_subjects!r}")
    storage = actual.storage.value if isinstance(actual.storage, jsapi.StorageType) else str(actual.storage)
    if storage != cfg.storage:
        out.append(f"storage is {storage!r}, configured {cfg.storage!r}")
    replicas = actual.num_replicas or 1
    if replicas != cfg.replicas:
        out.append(f"replicas is {replicas}, configured {cfg.replicas}")
    window = float(actual.duplicate_window or 0)
    if abs(window - cfg.duplicate_window) > _WINDOW_TOLERANCE:
        out.append(f"duplicate window is {window:g}s, configured {cfg.duplicate_window:g}s")
    out.extend(limit_mismatches(actual, cfg))
    return out


def limit_mismatches(actual: jsapi.StreamConfig, cfg: StreamConfig) -> list[str]:
    """Differences between an existing stream's limits and the configured ones (pure).

    JetStream spells "no limit" as 0 (``max_age``) or -1 (the others).  A stream without a
    limit grows without bound, so that is reported as ``unlimited``, never accepted.
    """
    out: list[str] = []
    age = float(actual.max_age or 0)
    if age <= 0:
        out.append(f"max-age is unlimited, configured {cfg.max_age:g}s")
    elif abs(age - cfg.max_age) > _WINDOW_TOLERANCE:
        out.append(f"max-age is {age:g}s, configured {cfg.max_age:g}s")
    for label, have, want in (
        ("max-bytes", actual.max_bytes, cfg.max_bytes),
        ("max-msgs-per-subject", actual.max_msgs_per_subject, cfg.max_msgs_per_subject),
    ):
        n = int(have) if have is not None else -1
        if n <= 0:
            out.append(f"{label} is unlimited, configured {want}")
        elif n != want:
            out.append(f"{label} is {n}, configured {want}")
    return out


def _unavailable(cfg: StreamConfig, exc: BaseException) -> BackendUnavailable:
    return BackendUnavailable(
        f"JetStream did not answer for stream {cfg.name} ({type(exc).__name__}: {exc}); is JetStream enabled?",
        backend="nats",
    )


async def _info(js: JetStreamContext, cfg: StreamConfig) -> jsapi.StreamInfo | None:
    try:
        return await js.stream_info(cfg.name)
    except nats.js.errors.NotFoundError:
        return None
    except _UNAVAILABLE as exc:
        raise _unavailable(cfg, exc) from None
    except nats.js.errors.APIError as exc:
        raise CheckFailed(f"stream {cfg.name}: JetStream refused the info request: {exc}") from None


def _status(info: jsapi.StreamInfo, cfg: StreamConfig, created: bool, cluster: str) -> StreamStatus:
    state: Any = info.state
    return StreamStatus(
        name=cfg.name,
        created=created,
        mismatches=tuple(stream_mismatches(info.config, cfg, cluster=cluster)),
        messages=int(getattr(state, "messages", 0) or 0),
    )


async def ensure_stream(js: JetStreamContext, cfg: StreamConfig, *, cluster: str) -> StreamStatus:
    """Create ``cluster``'s stream if missing, else verify it (never modifies an existing stream)."""
    info = await _info(js, cfg)
    if info is not None:
        return _status(info, cfg, False, cluster)
    try:
        info = await js.add_stream(desired_config(cfg, cluster=cluster))
    except _UNAVAILABLE as exc:
        raise _unavailable(cfg, exc) from None
    except nats.js.errors.APIError as exc:
        # Another agent may have created it between our info and add (with other settings, the
        # server says "already in use"): then verify what is there.  Otherwise it is a refusal
        # such as "subjects overlap with an existing stream".
        info2 = await _info(js, cfg)
        if info2 is None:
            raise CheckFailed(f"cannot create stream {cfg.name}: {exc.description or exc}") from None
        return _status(info2, cfg, False, cluster)
    return _status(info, cfg, True, cluster)


async def verify_stream(js: JetStreamContext, cfg: StreamConfig, *, cluster: str) -> StreamStatus:
    """Verify ``cluster``'s existing stream; ``NotFound`` if it does not exist."""
    info = await _info(js, cfg)
    if info is None:
        raise NotFound(f"JetStream stream {cfg.name} does not exist")
    return _status(info, cfg, False, cluster)


__all__ = ["MSG_ID_HEADER", "StreamStatus", "desired_config", "ensure_stream", "limit_mismatches", "stream_mismatches", "verify_stream"]
