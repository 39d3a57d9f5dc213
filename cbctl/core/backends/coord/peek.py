"""Best-effort listing of key names for tab completion: one bounded HTTP request, no client library.

Contract: :func:`list_key_suffixes` returns the key suffixes under a prefix, or ``[]`` on any
error (unreachable, refused, TLS or auth failure, slow, malformed reply); it never raises and
never writes. It is NOT a :class:`~cbctl.core.backends.coord.base.Coordinator`: commands keep
using the coordinators (their errors, retries and failover); this exists because completion
runs on every TAB, where importing aetcd/grpc alone costs more than the whole answer may take.

It speaks etcd's JSON gateway (``POST /v3/kv/range``, keys only; etcd 3.4+) or Consul's KV API
(``GET /v1/kv/<prefix>?keys``), over http or https (the context's CA, client certificate and
key), with the context's credentials (etcd ``/v3/auth/authenticate``; Consul ACL token). It tries
the first endpoint only: a completion does not wait for failover. ``coordination`` is the raw
``[contexts.X.coordination]`` table of the contexts file.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit


def _secret(coordination: Mapping[str, Any]) -> str | None:
    """The password/token named by ``password-env``/``password-file`` (never logged)."""
    env = coordination.get("password-env")
    if isinstance(env, str):
        return os.environ.get(env)
    path = coordination.get("password-file")
    if isinstance(path, str):
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        return lines[0] if lines else ""
    return None


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for a prefix (the prefix with its last byte incremented)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def list_key_suffixes(coordination: Mapping[str, Any], prefix: str, *, timeout: float = 0.1) -> list[str]:
    """Key names under ``prefix`` with the prefix removed, sorted; ``[]`` on any error."""
    try:
        return sorted(_list(coordination, prefix, time.monotonic() + timeout))
    except Exception:  # noqa: BLE001 - best effort by contract
        return []


def _list(coordination: Mapping[str, Any], prefix: str, deadline: float) -> list[str]:
    import http.client

    endpoints = coordination.get("endpoints") or ["http://127.0.0.1:2379"]
    url = urlsplit(str(endpoints[0]))
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not url.hostname:
        return []
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        import ssl

        tls = coordination.get("tls") or {}
        sslctx = ssl.create_default_context(cafile=tls.get("ca-file"))
        if tls.get("cert-file"):
            sslctx.load_cert_chain(tls["cert-file"], tls.get("key-file"))
        conn = http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=remaining, context=sslctx)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=remaining)

    def call(method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        if time.monotonic() >= deadline:
            raise TimeoutError("completion budget spent")
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}")
        return json.loads(payload or b"null")

    try:
        secret = _secret(coordination)
        if coordination.get("backend", "etcd") == "consul":
            headers = {"X-Consul-Token": secret} if secret else {}
            keys = call("GET", "/v1/kv/" + quote(prefix.lstrip("/")) + "?keys", headers=headers) or []
            cut = len(prefix.lstrip("/"))
            return [k[cut:] for k in keys if isinstance(k, str) and len(k) > cut and "/" not in k[cut:]]
        headers = {}
        user = coordination.get("username")
        if isinstance(user, str) and secret is not None:
            headers["Authorization"] = str(call("POST", "/v3/auth/authenticate",
                                                {"name": user, "password": secret})["token"])
        raw = prefix.encode()
        reply = call("POST", "/v3/kv/range", {"key": base64.b64encode(raw).decode(),
                                              "range_end": base64.b64encode(_prefix_end(raw)).decode(),
                                              "keys_only": True}, headers)
        out = []
        for kv in reply.get("kvs") or []:
            suffix = base64.b64decode(kv["key"])[len(raw):].decode("utf-8", "replace")
            if suffix and "/" not in suffix:
                out.append(suffix)
        return out
    finally:
        conn.close()
