"""The contexts file (``~/.config/cbctl/config.toml``; ``CBCTL_CONFIG`` overrides the path).

Contract: the file format and its keys (README.md; docs/model.md, Config). Loading validates
every context strictly (unknown keys refused with a "did you mean"), secrets are only named by
reference (``*-env`` / ``*-file``) and resolved at use into a :class:`Secret` that never prints.
Reads the file; no other I/O.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbctl.core.model.errors import ConfigError
from cbctl.core.model.gate_settings import gate_config
from cbctl.core.model.redaction import LITERAL_SECRET_KEYS, refuse_url_credentials

DEFAULT_CONFIG_PATH = Path("~/.config/cbctl/config.toml")

TOP_LEVEL_KEYS: frozenset[str] = frozenset({"current-context", "contexts"})

# The free-form sections of a context (kept raw in ``Context.extra``) and the keys their readers
# use: [preflight] max-age (cbctl/core/model/gate_settings.py), probe-stale-after (cbctl/core/backends/probes.py);
# [agent] probe-interval (cbctl/core/backends/probes.py), outbox-max (the agent's outbox bound);
# [exit-criteria] window (cbctl/cli/exit_criteria.py); [sandbox] dir (cbctl/cli/sandbox.py).
# [gates] is validated by cbctl.core.model.gate_settings.gate_config, its one validator.
SECTION_KEYS: Mapping[str, frozenset[str]] = {
    "preflight": frozenset({"max-age", "probe-stale-after"}),
    "agent": frozenset({"probe-interval", "outbox-max"}),
    "exit-criteria": frozenset({"window"}),
    "sandbox": frozenset({"dir"}),
}
# Keys of those sections whose value is a duration: checked at load, not at first use.
_SECTION_DURATIONS: Mapping[str, tuple[str, ...]] = {
    "preflight": ("max-age", "probe-stale-after"),
    "agent": ("probe-interval",),
    "exit-criteria": ("window",),
}

class Secret:
    """A resolved secret. Never printed: ``str``/``repr`` are redacted; use :meth:`reveal`."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted> from {self.source})"

    __str__ = __repr__


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives: an environment variable name or a file path (first line)."""

    env: str | None = None
    file: str | None = None

    def __bool__(self) -> bool:
        return bool(self.env or self.file)

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}" if self.file else "none"

    def resolve(self) -> Secret | None:
        """Read the secret now. Raises ``ConfigError`` naming the reference, never the value."""
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} (secret reference) is not set")
            return Secret(value, f"env:{self.env}")
        if self.file:
            path = Path(self.file).expanduser()
            try:
                value = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
            except OSError as exc:
                raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
            return Secret(value, f"file:{path}")
        return None


@dataclass(frozen=True)
class TLSConfig:
    """Client TLS settings (paths only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __bool__(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)


@dataclass(frozen=True)
class CoordinationConfig:
    backend: str = "etcd"
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    username: str | None = None
    password: SecretRef = field(default_factory=SecretRef)
    tls: TLSConfig = field(default_factory=TLSConfig)
    timeout: float = 5.0
    lease_ttl: float = 10.0
    keepalive_interval: float = 2.0


DEFAULT_STREAM_MAX_AGE = 7 * 86400.0
DEFAULT_STREAM_MAX_BYTES = 1 << 30
DEFAULT_STREAM_MAX_MSGS_PER_SUBJECT = 10_000
DEFAULT_REDIS_RETENTION = 7 * 86400.0
DEFAULT_REDIS_HISTORY_MAX = 1_000


def default_stream_name(cluster: str) -> str:
    """``CB_<CLUSTER>_EVENTS``: one stream per cluster, so clusters can share a NATS account.

    JetStream names may not hold ``.``, ``*``, ``>``, whitespace or path separators; anything
    outside ``[A-Za-z0-9_-]`` becomes ``_``.
    """
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in cluster.upper())
    return f"CB_{safe}_EVENTS"


@dataclass(frozen=True)
class StreamConfig:
    """``[contexts.X.nats.stream]``.  The limits bound the stream's disk use: JetStream discards
    the oldest messages past any of them (``max_msgs_per_subject`` counts per workflow and
    schema version, since each workflow has its own subject)."""

    name: str = "CB_EVENTS"
    storage: str = "file"  # file | memory
    replicas: int = 1
    duplicate_window: float = 120.0  # seconds; JetStream's default is 2 min
    max_age: float = DEFAULT_STREAM_MAX_AGE  # seconds
    max_bytes: int = DEFAULT_STREAM_MAX_BYTES
    max_msgs_per_subject: int = DEFAULT_STREAM_MAX_MSGS_PER_SUBJECT


@dataclass(frozen=True)
class NatsConfig:
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: SecretRef = field(default_factory=SecretRef)
    token: SecretRef = field(default_factory=SecretRef)
    creds_file: str | None = None
    nkey_file: str | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    connect_timeout: float = 2.0


@dataclass(frozen=True)
class RedisConfig:
    """``[contexts.X.redis]``.  ``retention``: how long a finished workflow's keys live (seconds);
    ``history_max``: entries kept in one workflow's history stream."""

    url: str = "redis://127.0.0.1:6379/0"
    password: SecretRef = field(default_factory=SecretRef)
    retention: float = DEFAULT_REDIS_RETENTION
    history_max: int = DEFAULT_REDIS_HISTORY_MAX


@dataclass(frozen=True)
class PrometheusConfig:
    url: str = "http://127.0.0.1:9090"


@dataclass(frozen=True)
class Context:
    """One named context: where a cluster's backends are and how to reach them."""

    name: str
    cluster: str
    lanes: tuple[str, ...]
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    ntp_servers: tuple[str, ...] = ()
    expected_nodes: tuple[str, ...] = ()
    # Free-form sections owned by later modules (gates overrides, preflight ages, ...).
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """Key prefix of this cluster in the coordination store, with trailing slash."""
        return f"/cbctl/{self.cluster}/"


@dataclass
class ConfigFile:
    """The whole contexts file as loaded: raw TOML (for writing back) plus its path."""

    path: Path
    raw: dict[str, Any]

    @property
    def current_context(self) -> str | None:
        return self.raw.get("current-context")

    def context_names(self) -> list[str]:
        return sorted(self.raw.get("contexts", {}))

    def context(self, name: str | None = None) -> Context:
        """The named context, else ``CBCTL_CONTEXT``, else ``current-context``."""
        name = name or os.environ.get("CBCTL_CONTEXT") or self.current_context
        if not name:
            raise ConfigError(f"{self.path}: no context selected (set current-context, CBCTL_CONTEXT or --context)")
        contexts = self.raw.get("contexts", {})
        if name not in contexts:
            known = ", ".join(sorted(contexts)) or "none"
            raise ConfigError(f"{self.path}: context {name!r} is not defined (known: {known})")
        return parse_context(name, contexts[name], where=f"{self.path}: contexts.{name}")

    def save(self) -> None:
        """Write atomically (temp file + rename), mode 0600: the file may name secret files."""
        import tomli_w

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(self.raw, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else ``$CBCTL_CONFIG``, else ``~/.config/cbctl/config.toml``."""
    raw = explicit or os.environ.get("CBCTL_CONFIG") or DEFAULT_CONFIG_PATH
    return Path(raw).expanduser()


def load_config(path: str | os.PathLike[str] | None = None, *, missing_ok: bool = False) -> ConfigFile:
    """Load and syntax-check the contexts file. ``missing_ok`` gives an empty file."""
    p = config_path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return ConfigFile(p, {"contexts": {}})
        raise ConfigError(f"{p}: config file not found (create it or run 'cbctl config set-context')") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    validate_config(raw, p)
    return ConfigFile(p, raw)


def validate_config(raw: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse a contexts file that is wrong anywhere (``ConfigError``, exit 2), naming the file
    and the key: a credential inside any URL (never echoing the value), an unknown key with a
    "did you mean", a bad value in any context — whichever context is in use."""
    refuse_url_credentials(raw, str(path))
    _check_unknown(raw, set(TOP_LEVEL_KEYS), f"{path}")
    contexts = raw.get("contexts", {})
    if not isinstance(contexts, dict):
        raise ConfigError(f"{path}: 'contexts' must be a table")
    current = raw.get("current-context")
    if current is not None and not isinstance(current, str):
        raise ConfigError(f"{path}: current-context: expected a context name, got a {type(current).__name__}")
    for name, table in contexts.items():
        parse_context(name, table, where=f"{path}: contexts.{name}")


# -- parsing -------------------------------------------------------------------------------

def _expect(value: Any, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    _expect(value, list, where)
    for i, item in enumerate(value):
        _expect(item, str, f"{where}[{i}]")
    return tuple(value)


def _secret_ref(table: Mapping[str, Any], name: str, where: str) -> SecretRef:
    if name in table:
        raise ConfigError(
            f"{where}.{name}: secrets are not accepted literally; use {name}-env (variable name) or {name}-file (path)"
        )
    env = table.get(f"{name}-env")
    file = table.get(f"{name}-file")
    if env is not None:
        _expect(env, str, f"{where}.{name}-env")
    if file is not None:
        _expect(file, str, f"{where}.{name}-file")
    if env and file:
        raise ConfigError(f"{where}: give {name}-env or {name}-file, not both")
    return SecretRef(env=env, file=file)


def _tls(table: Mapping[str, Any], where: str) -> TLSConfig:
    t = table.get("tls", {})
    _expect(t, dict, f"{where}.tls")
    vals = {}
    for key in ("ca-file", "cert-file", "key-file"):
        if key in t:
            vals[key.replace("-", "_")] = _expect(t[key], str, f"{where}.tls.{key}")
    return TLSConfig(**vals)


def _number(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    v = table.get(key, default)
    _expect(v, (int, float), f"{where}.{key}")
    if isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{where}.{key}: must be a positive number, got {v!r}")
    return float(v)


def _duration_key(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    """A positive duration: ``"7d"``, ``"90s"`` or a number of seconds."""
    from cbctl.core.model.durations import parse_duration  # pure; kept local to keep this module's imports flat
    from cbctl.core.model.errors import BadInput

    v = table.get(key, default)
    try:
        return parse_duration(v, what=f"{where}.{key}")
    except BadInput as exc:
        raise ConfigError(str(exc)) from None


def _positive_int(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    v = table.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{where}.{key}: must be a positive integer, got {v!r}")
    return v


def _stream_name(v: Any, where: str) -> str:
    _expect(v, str, where)
    if not v or any(not (c.isalnum() or c in "_-") for c in v):
        raise ConfigError(f"{where}: {v!r} is not a valid JetStream stream name (letters, digits, _ and - only)")
    return v


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, else ``""``."""
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_unknown(table: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    for key in table:
        if key in LITERAL_SECRET_KEYS:
            continue  # reported by _secret_ref with a better message
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; "
                              f"allowed: {', '.join(sorted(allowed))}")


def _no_userinfo(url: str, where: str) -> None:
    """Credentials inside a URL would be printed wherever the URL is (targets, errors): refuse."""
    if "@" in url.split("//", 1)[-1]:
        raise ConfigError(f"{where}: credentials in the URL are not accepted; use the *-env or *-file settings")


def lane_names(count: int) -> tuple[str, ...]:
    """``lane-count = N`` expands to lane-00 .. lane-(N-1), zero-padded to at least 2 digits."""
    width = max(2, len(str(count - 1)))
    return tuple(f"lane-{i:0{width}d}" for i in range(count))


def parse_context(name: str, table: Any, *, where: str) -> Context:
    """Validate one ``[contexts.NAME]`` table into a :class:`Context`."""
    _expect(table, dict, where)
    _check_unknown(
        table,
        {"cluster", "lanes", "lane-count", "coordination", "nats", "redis", "prometheus", "ntp-servers",
         "expected-nodes", "gates", "preflight", "agent", "sandbox", "exit-criteria"},
        where,
    )
    cluster = _expect(table.get("cluster", name), str, f"{where}.cluster")
    if not cluster or "/" in cluster:
        raise ConfigError(f"{where}.cluster: must be a non-empty name without '/', got {cluster!r}")

    if "lanes" in table and "lane-count" in table:
        raise ConfigError(f"{where}: give lanes or lane-count, not both")
    if "lanes" in table:
        lanes = _str_list(table["lanes"], f"{where}.lanes")
    elif "lane-count" in table:
        count = _expect(table["lane-count"], int, f"{where}.lane-count")
        if not 1 <= count <= 4096:
            raise ConfigError(f"{where}.lane-count: must be 1..4096, got {count}")
        lanes = lane_names(count)
    else:
        lanes = lane_names(16)
    if len(set(lanes)) != len(lanes):
        raise ConfigError(f"{where}.lanes: duplicate lane ids")
    for lane in lanes:
        if not lane or any(c in lane for c in "/ \t.*>"):
            raise ConfigError(f"{where}.lanes: invalid lane id {lane!r}")

    c = table.get("coordination", {})
    cw = f"{where}.coordination"
    _expect(c, dict, cw)
    _check_unknown(c, {"backend", "endpoints", "username", "password-env", "password-file", "tls", "timeout",
                       "lease-ttl", "keepalive-interval"}, cw)
    backend = c.get("backend", "etcd")
    if backend not in ("etcd", "consul"):
        raise ConfigError(f"{cw}.backend: must be 'etcd' or 'consul', got {backend!r}")
    endpoints = _str_list(c.get("endpoints", ["http://127.0.0.1:2379"]), f"{cw}.endpoints")
    if not endpoints:
        raise ConfigError(f"{cw}.endpoints: at least one endpoint is required")
    for ep in endpoints:
        _no_userinfo(ep, f"{cw}.endpoints")
    for ep in endpoints:
        if not ep.startswith(("http://", "https://")):
            raise ConfigError(f"{cw}.endpoints: {ep!r} must start with http:// or https://")
    coordination = CoordinationConfig(
        backend=backend,
        endpoints=endpoints,
        username=c.get("username") and _expect(c["username"], str, f"{cw}.username"),
        password=_secret_ref(c, "password", cw),
        tls=_tls(c, cw),
        timeout=_number(c, "timeout", 5.0, cw),
        lease_ttl=_number(c, "lease-ttl", 10.0, cw),
        keepalive_interval=_number(c, "keepalive-interval", 2.0, cw),
    )

    n = table.get("nats", {})
    nw = f"{where}.nats"
    _expect(n, dict, nw)
    _check_unknown(n, {"servers", "user", "password-env", "password-file", "token-env", "token-file", "creds-file",
                       "nkey-file", "tls", "stream", "connect-timeout"}, nw)
    s = n.get("stream", {})
    _expect(s, dict, f"{nw}.stream")
    _check_unknown(s, {"name", "storage", "replicas", "duplicate-window", "max-age", "max-bytes",
                       "max-msgs-per-subject"}, f"{nw}.stream")
    storage = s.get("storage", "file")
    if storage not in ("file", "memory"):
        raise ConfigError(f"{nw}.stream.storage: must be 'file' or 'memory', got {storage!r}")
    replicas = _expect(s.get("replicas", 1), int, f"{nw}.stream.replicas")
    if not 1 <= replicas <= 5:
        raise ConfigError(f"{nw}.stream.replicas: must be 1..5, got {replicas}")
    servers = _str_list(n.get("servers", ["nats://127.0.0.1:4222"]), f"{nw}.servers")
    for server in servers:
        _no_userinfo(server, f"{nw}.servers")
    nats = NatsConfig(
        servers=servers,
        user=n.get("user") and _expect(n["user"], str, f"{nw}.user"),
        password=_secret_ref(n, "password", nw),
        token=_secret_ref(n, "token", nw),
        creds_file=n.get("creds-file") and _expect(n["creds-file"], str, f"{nw}.creds-file"),
        nkey_file=n.get("nkey-file") and _expect(n["nkey-file"], str, f"{nw}.nkey-file"),
        tls=_tls(n, nw),
        stream=StreamConfig(
            name=_stream_name(s.get("name", default_stream_name(cluster)), f"{nw}.stream.name"),
            storage=storage,
            replicas=replicas,
            duplicate_window=_number(s, "duplicate-window", 120.0, f"{nw}.stream"),
            max_age=_duration_key(s, "max-age", DEFAULT_STREAM_MAX_AGE, f"{nw}.stream"),
            max_bytes=_positive_int(s, "max-bytes", DEFAULT_STREAM_MAX_BYTES, f"{nw}.stream"),
            max_msgs_per_subject=_positive_int(s, "max-msgs-per-subject", DEFAULT_STREAM_MAX_MSGS_PER_SUBJECT,
                                               f"{nw}.stream"),
        ),
        connect_timeout=_number(n, "connect-timeout", 2.0, nw),
    )

    r = table.get("redis", {})
    rw = f"{where}.redis"
    _expect(r, dict, rw)
    _check_unknown(r, {"url", "password-env", "password-file", "retention", "history-max"}, rw)
    url = _expect(r.get("url", "redis://127.0.0.1:6379/0"), str, f"{rw}.url")
    _no_userinfo(url, f"{rw}.url")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{rw}.url: {url!r} must start with redis://, rediss:// or unix://")
    redis_cfg = RedisConfig(
        url=url,
        password=_secret_ref(r, "password", rw),
        retention=_duration_key(r, "retention", DEFAULT_REDIS_RETENTION, rw),
        history_max=_positive_int(r, "history-max", DEFAULT_REDIS_HISTORY_MAX, rw),
    )

    p = table.get("prometheus", {})
    pw = f"{where}.prometheus"
    _expect(p, dict, pw)
    _check_unknown(p, {"url"}, pw)
    prom = PrometheusConfig(url=_expect(p.get("url", "http://127.0.0.1:9090"), str, f"{pw}.url"))
    _no_userinfo(prom.url, f"{pw}.url")

    extra = {k: table[k] for k in ("gates", "preflight", "agent", "sandbox", "exit-criteria") if k in table}
    for k, v in extra.items():
        _expect(v, dict, f"{where}.{k}")
        if k in SECTION_KEYS:
            _check_unknown(v, SECTION_KEYS[k], f"{where}.{k}")
        for key in _SECTION_DURATIONS.get(k, ()):
            if key in v:
                _duration_key(v, key, 0.0, f"{where}.{k}")
    if "sandbox" in extra and "dir" in extra["sandbox"]:
        _expect(extra["sandbox"]["dir"], str, f"{where}.sandbox.dir")

    context = Context(
        name=name,
        cluster=cluster,
        lanes=lanes,
        coordination=coordination,
        nats=nats,
        redis=redis_cfg,
        prometheus=prom,
        ntp_servers=_str_list(table.get("ntp-servers", []), f"{where}.ntp-servers"),
        expected_nodes=_str_list(table.get("expected-nodes", []), f"{where}.expected-nodes"),
        extra=extra,
    )
    if "gates" in extra or "preflight" in extra:
        _check_gates(context, where)
    return context


_GATES_UNKNOWN = re.compile(r"unknown key '([^']*)' \(allowed: ([^)]*)\)")


def _check_gates(context: Context, where: str) -> None:
    """Run the gates table through its one validator now (:func:`gate_config`), so a mistake in
    [gates] is refused at load rather than when ``watch`` or ``advance`` runs."""
    try:
        gate_config(context)
    except ConfigError as exc:
        message = str(exc)
        m = _GATES_UNKNOWN.search(message)
        if m:
            message += did_you_mean(m.group(1), [a.strip() for a in m.group(2).split(",")])
        prefix = where.split(": contexts.", 1)[0] if ": contexts." in where else ""
        raise ConfigError(f"{prefix}: {message}" if prefix else message) from None




__all__ = [
    "ConfigFile", "Context", "CoordinationConfig", "NatsConfig", "RedisConfig", "PrometheusConfig", "Secret",
    "SECTION_KEYS", "SecretRef", "StreamConfig", "TLSConfig", "config_path", "did_you_mean",
    "lane_names", "load_config", "parse_context", "validate_config",
]
