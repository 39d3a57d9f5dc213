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
``[contexts.X.coordination]`` table of the contexts file. The HTTP(S) client is
:class:`~cbctl.core.backends.coord.etcd_gateway.GatewayClient` (the one gateway client; no asyncio).
"""

from __future__ import annotations

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


def list_key_suffixes(coordination: Mapping[str, Any], prefix: str, *, timeout: float = 0.1) -> list[str]:
    """Key names under ``prefix`` with the prefix removed, sorted; ``[]`` on any error."""
    try:
        return sorted(_list(coordination, prefix, time.monotonic() + timeout))
    except Exception:  # noqa: BLE001 - best effort by contract
        return []


def _list(coordination: Mapping[str, Any], prefix: str, deadline: float) -> list[str]:
    from cbctl.core.backends.coord.etcd_gateway import GatewayClient, prefix_range_end, ssl_context

    endpoints = coordination.get("endpoints") or ["http://127.0.0.1:2379"]
    url = urlsplit(str(endpoints[0]))
    if not url.hostname:
        return []
    tls = None
    if url.scheme == "https":
        files = coordination.get("tls") or {}
        tls = ssl_context(files.get("ca-file"), files.get("cert-file"), files.get("key-file"))
    consul = coordination.get("backend", "etcd") == "consul"
    secret = _secret(coordination)
    user = coordination.get("username")
    client = GatewayClient(str(endpoints[0]), url.hostname, url.port or (8500 if consul else 2379), tls=tls,
                           username=user if isinstance(user, str) and secret is not None and not consul else None,
                           password=secret)
    try:
        if consul:
            headers = {"X-Consul-Token": secret} if secret else {}
            status, payload = client.request("GET", "/v1/kv/" + quote(prefix.lstrip("/")) + "?keys", None, deadline,
                                             headers)
            if status != 200:
                return []
            keys = json.loads(payload or b"null") or []
            cut = len(prefix.lstrip("/"))
            return [k[cut:] for k in keys if isinstance(k, str) and len(k) > cut and "/" not in k[cut:]]
        raw = prefix.encode()
        _, kvs = client.range(raw, prefix_range_end(raw), deadline, keys_only=True)
        out = []
        for kv in kvs:
            suffix = kv.key[len(raw):].decode("utf-8", "replace")
            if suffix and "/" not in suffix:
                out.append(suffix)
        return out
    finally:
        client.close()
