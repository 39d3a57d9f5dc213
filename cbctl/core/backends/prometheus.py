"""A small async client of the Prometheus HTTP API (httpx), and the one duration parser of cbctl.

Errors, converted here and nowhere else: transport errors, timeouts and 5xx ->
:class:`BackendUnavailable` (backend ``prometheus``, exit 4); ``errorType: bad_data`` (PromQL
syntax, a bad range) -> :class:`BadInput` naming the query (exit 2).  Why httpx and which
endpoints: docs/backends.md, "Prometheus".
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from cbctl.core.model.errors import BackendUnavailable, BadInput

__all__ = [
    "PromClient",
    "Sample",
    "Series",
    "Target",
    "format_duration",
    "parse_duration",
    "range_spans",
    "scope_selectors",
]

# Durations live in cbctl.core.model.durations (no httpx import there); re-exported for callers.
from cbctl.core.model.durations import format_duration, parse_duration  # noqa: E402,F401


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector (or a scalar, with empty labels)."""

    labels: Mapping[str, str]
    value: float
    timestamp: float


@dataclass(frozen=True)
class Series:
    """One element of a range-query matrix: ``values`` are (timestamp, value) pairs."""

    labels: Mapping[str, str]
    values: Sequence[tuple[float, float]] = field(default_factory=tuple)


@dataclass(frozen=True)
class Target:
    """One active scrape target."""

    scrape_url: str
    labels: Mapping[str, str]
    health: str  # "up" | "down" | "unknown"
    last_error: str
    last_scrape: str
    scrape_interval: str = ""  # e.g. "15s"; reported by Prometheus >= 2.37


def _float(raw: Any) -> float:
    # Prometheus encodes sample values as strings ("NaN", "+Inf" included).
    return float(raw)


class PromClient:
    """Async Prometheus HTTP API client. Use as ``async with PromClient(url) as prom: ...``.

    One ``httpx.AsyncClient`` per instance (connection reuse across concurrent queries).
    ``timeout`` bounds every request; a query that times out raises ``BackendUnavailable``.
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> PromClient:
        self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout)
        return self._client

    async def _get(self, path: str, params: Mapping[str, Any] | None = None, *, what: str = "") -> Any:
        """GET an API path and return its ``data``; errors converted (module docstring)."""
        try:
            resp = await self._http().get(path, params=params)
        except httpx.TimeoutException:
            raise BackendUnavailable(
                f"prometheus {self.url}: no answer to {path} within {self.timeout:g}s", backend="prometheus"
            ) from None
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"prometheus {self.url}: {type(exc).__name__}: {exc}", backend="prometheus") from None
        if resp.status_code >= 500:
            raise BackendUnavailable(f"prometheus {self.url}: HTTP {resp.status_code} on {path}", backend="prometheus")
        try:
            body = resp.json()
        except ValueError:
            raise BackendUnavailable(
                f"prometheus {self.url}: HTTP {resp.status_code} on {path} is not JSON", backend="prometheus"
            ) from None
        if body.get("status") != "success":
            etype = body.get("errorType", "error")
            message = body.get("error", f"HTTP {resp.status_code}")
            if etype == "bad_data" or resp.status_code == 400:
                raise BadInput(f"prometheus rejected {what or path}: {message}")
            raise BackendUnavailable(f"prometheus {self.url}: {etype}: {message}", backend="prometheus")
        return body.get("data")

    # -- endpoints ---------------------------------------------------------------------------

    async def ready(self) -> bool:
        """True when ``/-/ready`` answers 200. Raises ``BackendUnavailable`` when unreachable."""
        try:
            resp = await self._http().get("/-/ready")
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"prometheus {self.url}: {type(exc).__name__}: {exc}", backend="prometheus") from None
        return resp.status_code == 200

    async def buildinfo(self) -> dict[str, Any]:
        data = await self._get("/api/v1/status/buildinfo")
        return dict(data or {})

    async def query(self, expr: str, *, at: float | None = None) -> list[Sample]:
        """Evaluate an instant query. A scalar result becomes one unlabelled sample; an empty
        vector is ``[]`` (the caller decides what "no data" means)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = await self._get("/api/v1/query", params, what=f"query {expr!r}")
        rtype = data.get("resultType")
        result = data.get("result")
        if rtype == "vector":
            return [Sample(r.get("metric", {}), _float(r["value"][1]), float(r["value"][0])) for r in result]
        if rtype == "scalar":
            return [Sample({}, _float(result[1]), float(result[0]))]
        raise BadInput(f"query {expr!r}: expected an instant vector or scalar, got {rtype}")

    async def query_value(self, expr: str, *, at: float | None = None) -> float | None:
        """The single value of a query that aggregates to one sample; None when empty.

        Several samples are refused (``BadInput``): a gate must not silently pick one series.
        """
        samples = await self.query(expr, at=at)
        if not samples:
            return None
        if len(samples) > 1:
            raise BadInput(f"query {expr!r} returned {len(samples)} series; aggregate it to one (e.g. sum(...))")
        return samples[0].value

    async def query_range(self, expr: str, *, start: float, end: float, step: float) -> list[Series]:
        """Evaluate a range query; ``step`` in seconds."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{max(step, 0.001):.3f}"}
        data = await self._get("/api/v1/query_range", params, what=f"range query {expr!r}")
        if data.get("resultType") != "matrix":
            raise BadInput(f"range query {expr!r}: expected a matrix, got {data.get('resultType')}")
        return [
            Series(r.get("metric", {}), tuple((float(t), _float(v)) for t, v in r.get("values", [])))
            for r in data.get("result", [])
        ]

    async def targets(self) -> list[Target]:
        """Active scrape targets with their health."""
        data = await self._get("/api/v1/targets", {"state": "active"})
        return [
            Target(
                scrape_url=t.get("scrapeUrl", ""),
                labels=t.get("labels", {}),
                health=t.get("health", "unknown"),
                last_error=t.get("lastError", ""),
                last_scrape=t.get("lastScrape", ""),
                scrape_interval=t.get("scrapeInterval", ""),
            )
            for t in data.get("activeTargets", [])
        ]

    async def metric_names(self) -> set[str]:
        """Every metric name with at least one series in the TSDB."""
        data = await self._get("/api/v1/label/__name__/values")
        return set(data or ())


# -- selector scoping -----------------------------------------------------------------------
#
# Every gate, watch, exit-criteria and runbook query is about ONE cluster, whatever the user
# wrote in a rule's ``expr`` or a runbook's ``check:``.  Instead of trusting each expression to
# carry ``cluster="..."``, the one evaluation path rewrites every vector selector of the
# expression to include the matcher.  A small tokenizer is enough: PromQL's selectors are the
# identifiers that are not functions, aggregations, keywords or label lists.

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                       "unless", "offset", "atan2", "inf", "nan"})
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                           "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:")
_IDENT_CHARS = _IDENT_START | frozenset("0123456789")


def _skip_string(expr: str, i: int) -> int:
    """Index just past the string literal starting at ``expr[i]`` (a quote)."""
    quote = expr[i]
    i += 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise BadInput(f"query {expr!r}: unterminated string")


def _skip_group(expr: str, i: int, open_: str, close: str) -> int:
    """Index just past the group opened at ``expr[i]``; strings inside are skipped whole."""
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise BadInput(f"query {expr!r}: unbalanced {open_!r}")


def _next_char(expr: str, i: int) -> tuple[str, int]:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return (expr[i], i) if i < len(expr) else ("", i)


def _next_word(expr: str, i: int) -> str:
    _, j = _next_char(expr, i)
    k = j
    while k < len(expr) and expr[k] in _IDENT_CHARS:
        k += 1
    return expr[j:k]


def scope_selectors(expr: str, labels: Mapping[str, str]) -> str:
    """``expr`` with ``labels`` (equality matchers) added to every vector selector.

    ``rate(x[5m])`` -> ``rate(x{cluster="a"}[5m])``; ``y{k="v"}`` -> ``y{cluster="a",k="v"}``;
    ``{__name__=~"z.*"}`` gets the matchers too.  A selector that already has a matcher on the
    same label keeps it, so both must hold (a selector of another cluster then selects
    nothing: it cannot widen the scope).  Function names, aggregations, keywords, label
    lists (``by (...)``, ``on (...)``), strings, ranges and comments are left alone.
    Raises ``BadInput`` for an unterminated string or an unbalanced bracket.
    """
    if not labels:
        return expr
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    matchers = ",".join(f"{k}={quote(v)}" for k, v in labels.items())
    out: list[str] = []
    i = 0
    n = len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            j = _skip_string(expr, i)
            out.append(expr[i:j])
            i = j
        elif c == "#":  # comment to the end of the line
            j = expr.find("\n", i)
            j = n if j < 0 else j
            out.append(expr[i:j])
            i = j
        elif c == "[":
            j = _skip_group(expr, i, "[", "]")
            out.append(expr[i:j])
            i = j
        elif c == "{":  # a selector without a metric name
            j = _skip_group(expr, i, "{", "}")
            out.append(_add_matchers(expr[i:j], matchers))
            i = j
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            j = i + 1
            while j < n and (expr[j] in _IDENT_CHARS or expr[j] == "."):
                j += 1
            out.append(expr[i:j])  # a number or a duration (5m, 1e3, 0x1f)
            i = j
        elif c in _IDENT_START:
            j = i + 1
            while j < n and expr[j] in _IDENT_CHARS:
                j += 1
            word = expr[i:j]
            out.append(word)
            nxt, k = _next_char(expr, j)
            low = word.lower()
            if low in _LABEL_LIST_KEYWORDS:
                if nxt == "(":
                    end = _skip_group(expr, k, "(", ")")
                    out.append(expr[j:end])
                    j = end
            elif low in _KEYWORDS or nxt == "(":
                pass  # a keyword, a function or an aggregation
            elif word in _AGGREGATIONS and _next_word(expr, j).lower() in ("by", "without"):
                pass  # `sum by (x) (...)`
            elif nxt == "{":
                end = _skip_group(expr, k, "{", "}")
                out.append(expr[j:k] + _add_matchers(expr[k:end], matchers))
                j = end
            else:
                out.append("{" + matchers + "}")
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _add_matchers(block: str, matchers: str) -> str:
    inner = block[1:-1]
    return "{" + matchers + ("," + inner if inner.strip() else "") + "}"


def range_spans(expr: str) -> list[float]:
    """The range (seconds) of every range selector and subquery in ``expr``: ``x[5m]`` -> 300,
    ``(...)[15s:1s]`` -> 15.  How far back from the evaluation instant the query reads."""
    spans: list[float] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "{":
            i = _skip_group(expr, i, "{", "}")
        elif c == "[":
            j = _skip_group(expr, i, "[", "]")
            body = expr[i + 1:j - 1].split(":", 1)[0].strip()
            if body:
                spans.append(parse_duration(body, what=f"range [{body}] in {expr!r}"))
            i = j
        else:
            i += 1
    return spans


def now() -> float:
    """Wall-clock time used as the evaluation instant (Prometheus timestamps are wall-clock)."""
    return time.time()
