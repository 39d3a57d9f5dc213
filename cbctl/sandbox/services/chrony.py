"""chronyd on loopback: an NTP server with its own (optionally skewed) clock."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from cbctl.sandbox.services.base import HarnessError, Service, udp_port_in_use

__all__ = ["ChronyServer"]


@dataclass(eq=False, repr=False, kw_only=True)
class ChronyServer(Service):
    """chronyd serving NTP on ``host``:``port`` (UDP) from its own clock, never touching the
    system clock (-x). ``offset_seconds`` runs it under ``faketime`` so it serves a clock that
    is off by that much (clock-skew tests).

    The command socket is ``data_dir/chronyd.sock`` (``chronyc -h PATH tracking`` works), so
    several servers never share /run/chrony. As root, ``user root`` stops chronyd from dropping
    to _chrony (which cannot write our root-owned dir); as non-root, ``-U`` lets it start.
    """

    binary = "chronyd"
    udp = True

    name: str = "chrony"
    stratum: int = 8
    offset_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.offset_seconds:
            faketime = shutil.which("faketime")
            if faketime is None:
                raise HarnessError(f"{self.name}: offset_seconds needs the faketime executable")
            self.wrapper = [faketime, "-f", f"{self.offset_seconds:+f}s", *self.wrapper]
        super().__post_init__()
        self.config_path = self.data_dir / "chrony.conf"
        self.command_socket = self.data_dir / "chronyd.sock"

    def tcp_endpoints(self) -> list[tuple[str, int]]:
        return []  # NTP is UDP; see check_ports_free

    def check_ports_free(self) -> None:
        assert self.port is not None
        if udp_port_in_use(self.host, self.port):
            raise HarnessError(f"{self.name}: UDP port {self.host}:{self.port} is already in use; "
                               "refusing to start a second server there")

    def prepare(self) -> None:
        lines = [
            f"port {self.port}",
            f"bindaddress {self.host}",
            f"local stratum {self.stratum}",
            f"allow {self.host}",
            "cmdport 0",  # no UDP command port; the Unix socket below remains
            f"bindcmdaddress {self.command_socket}",
            f"pidfile {self.data_dir / 'chronyd.pid'}",
            f"driftfile {self.data_dir / 'chrony.drift'}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        argv = ["chronyd", "-x", "-d", "-f", str(self.config_path)]
        if os.geteuid() != 0:
            argv.append("-U")  # allow start as non-root (no clock control is needed with -x)
        return argv

    def probe(self) -> bool:
        import ntplib

        assert self.port is not None
        try:
            ntplib.NTPClient().request(self.host, port=self.port, version=4, timeout=0.3)
        except ntplib.NTPException:  # no answer within the timeout
            return False
        return True

    def ntp_offset(self, timeout: float = 1.0) -> float:
        """Offset (s) of this server's clock against ours, from one SNTP query."""
        import ntplib

        assert self.port is not None
        try:
            return float(ntplib.NTPClient().request(self.host, port=self.port, version=4,
                                                    timeout=timeout).offset)
        except ntplib.NTPException as exc:
            raise HarnessError(f"{self.name}: no NTP answer from {self.host}:{self.port}") from exc

    def extra_info(self) -> dict[str, Any]:
        return {"protocol": "udp", "ntp": f"{self.host}:{self.port}",
                "offset_seconds": self.offset_seconds,
                "command_socket": str(self.command_socket)}
