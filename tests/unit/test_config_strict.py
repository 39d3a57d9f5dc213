"""Strict contexts file: a credential inside any URL and an unknown key anywhere are refused when
the file is loaded (exit 2, naming the file and the key, never the secret; "did you mean"), and
the config printers never show URL userinfo. Every config command goes through the loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbctl.core.model.config import load_config
from cbctl.core.model.redaction import redact_url, redacted
from cbctl.core.model.errors import ConfigError
from tests.helpers import cbctl_run

pytestmark = pytest.mark.timeout(60)

PASSWORD = "Pa55-do-not-print-7f3a"

BASE = """current-context = "a"
[contexts.a]
cluster = "a"
lanes = ["lane-00"]
[contexts.a.coordination]
endpoints = ["http://127.0.0.1:2379"]
[contexts.b]
cluster = "b"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text, encoding="utf-8")
    return p


CREDENTIAL_CASES = [
    pytest.param('[contexts.b.coordination]\nendpoints = ["http://root:{pw}@127.0.0.1:2379"]\n',
                 "contexts.b.coordination.endpoints[0]", id="etcd-endpoint"),
    pytest.param('[contexts.b.redis]\nurl = "redis://:{pw}@127.0.0.1:6379/0"\n', "contexts.b.redis.url", id="redis"),
    pytest.param('[contexts.b.nats]\nservers = ["nats://u:{pw}@127.0.0.1:4222"]\n', "contexts.b.nats.servers[0]",
                 id="nats"),
    pytest.param('[contexts.b.prometheus]\nurl = "https://admin:{pw}@prom.example:9090"\n',
                 "contexts.b.prometheus.url", id="prometheus"),
    # Not a known URL key: any string holding scheme://user@ is refused.
    pytest.param('[contexts.b.sandbox]\ndir = "ftp://x:{pw}@host/dir"\n', "contexts.b.sandbox.dir", id="anywhere"),
    # A URL with an invalid scheme for its key: refused for the credential, value never echoed.
    pytest.param('[contexts.b.redis]\nurl = "ftp://:{pw}@h"\n', "contexts.b.redis.url", id="bad-scheme"),
    # Passwords with '/', '?', '#' or '@' (base64 and friends): the whole userinfo counts.
    pytest.param('[contexts.b.coordination]\nendpoints = ["http://root:x/{pw}@127.0.0.1:2379"]\n',
                 "contexts.b.coordination.endpoints[0]", id="slash-in-password"),
    pytest.param('[contexts.b.redis]\nurl = "redis://:ab+/c?d#{pw}==@127.0.0.1:6379/0"\n', "contexts.b.redis.url",
                 id="query-and-fragment-chars-in-password"),
    pytest.param('[contexts.b.prometheus]\nurl = "http://u:p@{pw}@h:9090"\n', "contexts.b.prometheus.url",
                 id="at-sign-in-password"),
]


@pytest.mark.parametrize(("section", "key"), CREDENTIAL_CASES)
def test_a_credential_in_any_url_is_refused_at_load(tmp_path: Path, section: str, key: str) -> None:
    path = write(tmp_path, BASE + section.format(pw=PASSWORD))
    with pytest.raises(ConfigError) as info:
        load_config(path)  # context "a" is the one in use: "b" is checked all the same
    message = str(info.value)
    assert str(path) in message and key in message and "credentials" in message
    assert PASSWORD not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("command", [["config", "view"], ["config", "view", "-o", "json"], ["config", "get-contexts"],
                                     ["config", "get-contexts", "-o", "json"], ["stage", "status"]])
@pytest.mark.parametrize(("section", "key"), CREDENTIAL_CASES[:2])
def test_no_config_printer_shows_a_credential(tmp_path: Path, command: list[str], section: str, key: str) -> None:
    path = write(tmp_path, BASE + section.format(pw=PASSWORD))
    r = cbctl_run(path, *command)
    assert r.exit_code == 2, r.stdout + r.stderr
    assert key in r.stderr
    assert PASSWORD not in r.stdout + r.stderr


def test_printers_redact_url_userinfo_as_a_second_line_of_defence() -> None:
    # The loader refuses these; a raw table that slipped past it is still printed redacted.
    raw = {"contexts": {"x": {"coordination": {"endpoints": [f"http://root:{PASSWORD}@h:2379"]},
                              "redis": {"url": f"redis://:{PASSWORD}@h:6379/0"}}}}
    shown = repr(redacted(raw))
    assert PASSWORD not in shown
    assert "http://<redacted>@h:2379" in shown and "redis://<redacted>@h:6379/0" in shown
    assert redact_url("reach http://a:b@h/x and nats://h:4222") == "reach http://<redacted>@h/x and nats://h:4222"
    for url in (f"http://root:x/{PASSWORD}@h:2379", f"redis://:a?b#{PASSWORD}@h/0", f"http://u:p@{PASSWORD}@h"):
        assert PASSWORD not in redact_url(url) and "<redacted>@h" in redact_url(url)


STRICT_CASES = [
    pytest.param("[contexts.a.preflight]\nmax-agee = \"1s\"\n", "contexts.a.preflight", "max-agee", "max-age",
                 id="preflight"),
    pytest.param("[contexts.a.agent]\nprobe-intervall = \"1s\"\n", "contexts.a.agent", "probe-intervall",
                 "probe-interval", id="agent"),
    pytest.param("[contexts.a.exit-criteria]\nwindw = \"1h\"\n", "contexts.a.exit-criteria", "windw", "window",
                 id="exit-criteria"),
    pytest.param("[contexts.a.sandbox]\ndirr = \"/tmp\"\n", "contexts.a.sandbox", "dirr", "dir", id="sandbox"),
    pytest.param("[contexts.a.gates]\nwindows = \"10s\"\n", "contexts.a.gates", "windows", "window", id="gates"),
    pytest.param("[contexts.a.gates.rules.rollout-lag]\nthreshhold = 1\n", "contexts.a.gates.rules.rollout-lag",
                 "threshhold", "threshold", id="gates-rule"),
    pytest.param("[contexts.a.redis]\nurll = \"redis://h\"\n", "contexts.a.redis", "urll", "url", id="redis"),
    pytest.param("[contexts.a]\nexpected-node = []\n", "contexts.a", "expected-node", "expected-nodes",
                 id="context"),
]


@pytest.mark.parametrize(("extra", "where", "key", "suggestion"), STRICT_CASES)
def test_an_unknown_key_is_refused_with_did_you_mean(tmp_path: Path, extra: str, where: str, key: str,
                                                     suggestion: str) -> None:
    if extra.startswith("[contexts.a]\n"):  # a key of the context table itself
        text = BASE.replace('cluster = "a"\n', 'cluster = "a"\n' + extra.removeprefix("[contexts.a]\n"))
    else:  # a section table of context "a"
        text = BASE.replace("[contexts.b]", extra + "[contexts.b]")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, message
    assert where in message and repr(key) in message, message
    assert f"did you mean {suggestion!r}?" in message, message
    # And as a command: exit 2, the same message.
    r = cbctl_run(path, "config", "view")
    assert r.exit_code == 2 and f"did you mean {suggestion!r}?" in r.stderr


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'current-contex = "a"\n' + BASE.split("\n", 1)[1])
    with pytest.raises(ConfigError, match=r"unknown key 'current-contex' \(did you mean 'current-context'\?\)"):
        load_config(path)


def test_bad_values_in_sections_are_refused_at_load(tmp_path: Path) -> None:
    for extra, what in (('[contexts.b.preflight]\nmax-age = "soon"\n', "contexts.b.preflight.max-age"),
                        ('[contexts.b.exit-criteria]\nwindow = -1\n', "contexts.b.exit-criteria.window"),
                        ('[contexts.b.gates.stages]\n1 = ["no-such-rule"]\n', "contexts.b.gates.stages.1")):
        path = write(tmp_path, BASE + extra)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert what in str(info.value), str(info.value)


def test_every_known_key_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + """[contexts.b.preflight]
max-age = "30m"
probe-stale-after = "10s"
[contexts.b.agent]
probe-interval = "1s"
outbox-max = 1000
[contexts.b.exit-criteria]
window = "20s"
[contexts.b.sandbox]
dir = "/tmp/x"
[contexts.b.gates]
window = "10s"
min-samples = 3
rate-window = "10s"
scrape-interval = "1s"
[contexts.b.gates.rules.rollout-lag]
expr = "vector(0)"
""")
    cfg = load_config(path)
    assert cfg.context("b").extra["preflight"]["max-age"] == "30m"
