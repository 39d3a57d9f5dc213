"""Contexts file parsing: the contract format, secrets by reference only, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbctl.core.model.config import (
    Secret,
    SecretRef,
    lane_names,
    load_config,
    parse_context,
)
from cbctl.core.model.errors import ConfigError
from cbctl.core.model.redaction import check_private_file, redacted

SECRET = "hunter2-do-not-print"


def ctx(table: dict) -> object:
    return parse_context("c", table, where="contexts.c")


def test_contract_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'current-context = "sandbox"\n'
        "[contexts.sandbox]\n"
        'cluster = "sandbox"\n'
        'lanes = ["lane-00", "lane-01"]\n'
        "[contexts.sandbox.coordination]\n"
        'backend = "etcd"\n'
        'endpoints = ["http://127.0.0.1:2379"]\n'
        "[contexts.sandbox.nats]\n"
        'servers = ["nats://127.0.0.1:4222"]\n'
        "[contexts.sandbox.redis]\n"
        'url = "redis://127.0.0.1:6379/0"\n'
        "[contexts.sandbox.prometheus]\n"
        'url = "http://127.0.0.1:9090"\n'
    )
    c = load_config(path).context()
    assert c.name == "sandbox" and c.cluster == "sandbox" and c.prefix == "/cbctl/sandbox/"
    assert c.lanes == ("lane-00", "lane-01")
    assert c.coordination.endpoints == ("http://127.0.0.1:2379",)
    assert c.nats.servers == ("nats://127.0.0.1:4222",)
    assert c.redis.url == "redis://127.0.0.1:6379/0"
    assert c.prometheus.url == "http://127.0.0.1:9090"


def test_env_and_flag_select_the_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('current-context = "a"\n[contexts.a]\n[contexts.b]\ncluster = "bee"\n')
    monkeypatch.setenv("CBCTL_CONTEXT", "b")
    assert load_config(path).context().cluster == "bee"
    assert load_config(path).context("a").cluster == "a"
    with pytest.raises(ConfigError, match="'zzz' is not defined"):
        load_config(path).context("zzz")


def test_lane_count_expands() -> None:
    assert lane_names(3) == ("lane-00", "lane-01", "lane-02")
    assert lane_names(120)[-1] == "lane-119"
    assert ctx({"lane-count": 4}).lanes == ("lane-00", "lane-01", "lane-02", "lane-03")
    with pytest.raises(ConfigError, match="lanes or lane-count, not both"):
        ctx({"lane-count": 2, "lanes": ["a"]})


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"nats": {"password": SECRET}}, "contexts.c.nats.password"),
        ({"coordination": {"password": SECRET}}, "contexts.c.coordination.password"),
        ({"redis": {"password": SECRET}}, "contexts.c.redis.password"),
        ({"nats": {"token": SECRET}}, "contexts.c.nats.token"),
    ],
)
def test_literal_secrets_are_refused_without_echoing_them(table: dict, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        ctx(table)
    assert where in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "table",
    [
        {"nats": {"servers": [f"nats://ops:{SECRET}@127.0.0.1:4222"]}},
        {"coordination": {"endpoints": [f"http://root:{SECRET}@127.0.0.1:2379"]}},
        {"redis": {"url": f"redis://:{SECRET}@127.0.0.1:6379/0"}},
        {"prometheus": {"url": f"http://admin:{SECRET}@127.0.0.1:9090"}},
    ],
)
def test_credentials_inside_urls_are_refused(table: dict) -> None:
    with pytest.raises(ConfigError, match="credentials in the URL are not accepted") as info:
        ctx(table)
    assert SECRET not in str(info.value)


def test_secret_references_resolve_at_use_and_never_print(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CB_TEST_PW", SECRET)
    secret = SecretRef(env="CB_TEST_PW").resolve()
    assert isinstance(secret, Secret) and secret.reveal() == SECRET
    assert SECRET not in repr(secret) and SECRET not in str(secret) and SECRET not in f"{secret}"
    monkeypatch.delenv("CB_TEST_PW")
    with pytest.raises(ConfigError, match="CB_TEST_PW"):
        SecretRef(env="CB_TEST_PW").resolve()
    f = tmp_path / "pw"
    f.write_text(SECRET + "\n")
    assert SecretRef(file=str(f)).resolve().reveal() == SECRET  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="give password-env or password-file, not both"):
        ctx({"nats": {"password-env": "A", "password-file": "/b"}})


def test_unknown_keys_and_bad_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"contexts\.c\.nats: unknown key 'sever'"):
        ctx({"nats": {"sever": []}})
    with pytest.raises(ConfigError, match=r"contexts\.c\.coordination\.backend: must be 'etcd' or 'consul'"):
        ctx({"coordination": {"backend": "zookeeper"}})
    with pytest.raises(ConfigError, match=r"contexts\.c\.coordination\.lease-ttl: must be a positive number"):
        ctx({"coordination": {"lease-ttl": 0}})
    with pytest.raises(ConfigError, match="invalid lane id"):
        ctx({"lanes": ["ok", "not ok"]})


def test_redacted_view_hides_literal_secret_keys() -> None:
    raw = {"contexts": {"c": {"nats": {"password": SECRET, "password-env": "NATS_PW", "user": "ops"}}}}
    view = redacted(raw)
    assert view["contexts"]["c"]["nats"] == {"password": "<redacted>", "password-env": "NATS_PW", "user": "ops"}


def test_private_file_check(tmp_path: Path) -> None:
    f = tmp_path / "user.creds"
    f.write_text("x")
    os.chmod(f, 0o600)
    assert check_private_file(str(f)) is None
    os.chmod(f, 0o644)
    problem = check_private_file(str(f))
    assert problem is not None and "0644" in problem


def test_unreadable_config_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    assert load_config(tmp_path / "missing.toml", missing_ok=True).context_names() == []
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)
