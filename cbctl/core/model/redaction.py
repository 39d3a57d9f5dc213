"""Secrets never printed: URL credentials refused or redacted, config tables redacted for display,
private-file checks. Pure string work apart from :func:`check_private_file` (one ``stat``).

Contract: a credential inside a URL (``scheme://user:pass@host``) is never accepted in the
config file and never printed; messages name the key, never the value.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cbctl.core.model.errors import ConfigError

# Keys that would carry a secret literally: refused, the reference forms are accepted instead.
LITERAL_SECRET_KEYS = {"password", "token", "secret", "key-password"}

# ``scheme://userinfo@host``: the userinfo part, wherever it appears in a string.  Greedy up to
# the LAST ``@`` of the URL: passwords carry ``/``, ``?``, ``#`` and ``@`` in practice (base64),
# and stopping at the first of them would let the rest of the secret through.  A path that holds
# an ``@`` is refused/redacted too: the safe side.  Quotes and whitespace end a URL (printed
# JSON and tables).
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s\"'<>]*)@")


def refuse_url_credentials(value: Any, where: str, key: str = "") -> None:
    """Walk every string in the file: ``scheme://user[:pass]@`` anywhere is refused."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            refuse_url_credentials(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_url_credentials(v, where, f"{key}[{i}]")
    elif isinstance(value, str) and _URL_USERINFO.search(value):
        raise ConfigError(f"{where}: {key}: credentials inside a URL are not accepted (the value is not shown); "
                          "use the *-env or *-file settings")


def redact_url(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced: ``http://<redacted>@host``."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}<redacted>@", text)


def redacted(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a raw config table safe to print.

    The file holds only references, but a reference that is a file path into a secrets
    directory is still shown (it is not the secret); any key that looks like a literal secret
    is replaced, so a hand-edited file cannot leak through ``config view``.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out[key] = redacted(value)
        elif key in LITERAL_SECRET_KEYS or key.endswith(("-password", "-token", "-secret")):
            out[key] = "<redacted>"
        else:
            out[key] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    """Second line of defence behind :func:`validate_config`: URL userinfo never printed."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, Mapping):
        return redacted(value)
    return value


def check_private_file(path: str) -> str | None:
    """None if ``path`` is readable only by its owner, else a reason (used for creds files)."""
    try:
        mode = Path(path).expanduser().stat().st_mode
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path}: mode {stat.S_IMODE(mode):04o} is readable by group/others (want 0600)"
    return None


__all__ = ["LITERAL_SECRET_KEYS", "check_private_file", "redact_url", "redacted", "refuse_url_credentials"]
