"""Throwaway TLS material for sandbox servers (a CA and one server certificate), made with the
``openssl`` executable so no crypto library is needed."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cbctl.sandbox.services.base import HarnessError

__all__ = ["make_test_pki"]


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise HarnessError("openssl executable not found (run `make setup`)")
    result = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise HarnessError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_test_pki(directory: str | os.PathLike[str], hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                  days: int = 2) -> dict[str, Path]:
    """Create ``ca.pem``, ``server.pem`` and ``server-key.pem`` in ``directory``.

    The server certificate is signed by the CA and valid for ``hosts`` (IP addresses become IP
    SANs, names DNS SANs). Returns {"ca", "cert", "key"} paths, the shape
    ``NatsServer(tls=...)`` takes. Keys are EC P-256 (fast to generate) and mode 0600.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sans = []
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            sans.append(f"IP:{h}")
        except ValueError:
            sans.append(f"DNS:{h}")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", str(days),
             "-subj", "/CN=cbctl sandbox CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", *ec, "-keyout", "server-key.pem", "-out", "server.csr",
             "-subj", f"/CN={hosts[0]}", cwd=d)
    ext = d / "server.ext"
    ext.write_text(f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", "server.pem", "-days", str(days), "-extfile", str(ext), cwd=d)
    for key in ("ca-key.pem", "server-key.pem"):
        os.chmod(d / key, 0o600)
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server-key.pem"}
