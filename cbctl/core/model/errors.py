"""Error types of cbctl's core.

Every transport error (gRPC, HTTP, NATS, Redis) is converted into one of these at the backend
edge; nothing above a backend catches a library's exception. Each type carries the CLI exit
code the README's exit-code table assigns to it, so the CLI maps errors to exit codes in one place.
"""

from __future__ import annotations


class CbctlError(Exception):
    """Base of every cbctl error. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class CheckFailed(CbctlError):
    """A check, gate or criterion failed (exit 1)."""

    exit_code = 1


class BadInput(CbctlError):
    """Bad usage or bad input; nothing was written (exit 2)."""

    exit_code = 2


class ConfigError(BadInput):
    """The contexts file or a context in it is invalid (exit 2)."""


class Conflict(CbctlError):
    """Someone else changed the document or holds the key; nothing was written (exit 3)."""

    exit_code = 3

    def __init__(self, message: str, *, key: str | None = None, current_revision: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.current_revision = current_revision


class BackendUnavailable(CbctlError):
    """A backend (etcd, Consul, NATS, Redis, Prometheus) could not be reached (exit 4)."""

    exit_code = 4

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class AuthFailed(BackendUnavailable):
    """A backend answered but refused our credentials. Distinct from 'unreachable'."""


class LeaseLost(CbctlError):
    """A lease expired or was revoked: whatever it guarded must stop at once."""

    exit_code = 1

    def __init__(self, message: str, *, lease_id: int | str | None = None) -> None:
        super().__init__(message)
        self.lease_id = lease_id


class NotFound(CbctlError):
    """A key, node, lane or runbook does not exist (exit 2: the caller named it)."""

    exit_code = 2


class StaleFencingToken(CbctlError):
    """Redis rejected a lane write: the caller's fencing token is lower than one already seen."""

    exit_code = 1

    def __init__(self, message: str, *, lane: str, token: int, current_token: int) -> None:
        super().__init__(message)
        self.lane = lane
        self.token = token
        self.current_token = current_token
