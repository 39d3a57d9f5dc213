"""A real ``cbctl agent run`` child process for tests that kill, stop or duplicate an agent."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import CBCTL

__all__ = ["AgentProcess"]


class AgentProcess:
    """A real `cbctl agent run --handler demo` child in its own process group (SIGKILL/SIGSTOP-able).

    Started at construction; its output goes to ``log_path`` (under ``log_dir``). ``netns`` runs
    it inside that network namespace (``ip netns exec``).
    """

    def __init__(self, config: Path, node_id: str, state_dir: Path, log_dir: Path, *,
                 extra_args: Sequence[str] = (), netns: str | None = None) -> None:
        self.node_id = node_id
        self.log_path = log_dir / f"agent-{node_id}-{time.monotonic_ns()}.log"
        argv = [CBCTL, "agent", "run", "--handler", "demo", "--node-id", node_id, "--state-dir", str(state_dir), *extra_args]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        env = {**os.environ, "CBCTL_CONFIG": str(config), "NO_COLOR": "1"}
        env.pop("CBCTL_CONTEXT", None)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group (nothing if it is gone)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Teardown: CONT (it may be stopped), TERM, then KILL."""
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()
