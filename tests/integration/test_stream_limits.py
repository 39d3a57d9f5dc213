"""The event stream is created with the configured limits, and they really bound it (real nats-server)."""

from __future__ import annotations

from dataclasses import replace

import nats
import pytest

from cbctl.core.backends.nats.stream import desired_config, ensure_stream, verify_stream
from cbctl.core.model.config import StreamConfig, default_stream_name
from cbctl.core.model.events import subject

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_stream_is_created_with_the_configured_limits(shared_nats, unique_cluster: str) -> None:
    cfg = StreamConfig(name=default_stream_name(unique_cluster), max_age=3600.0, max_bytes=8 << 20,
                       max_msgs_per_subject=3)
    nc = await nats.connect(shared_nats.url)
    try:
        js = nc.jetstream()
        status = await ensure_stream(js, cfg, cluster=unique_cluster)
        assert status.created and status.ok, status.mismatches
        info = await js.stream_info(cfg.name)
        assert (info.config.max_age, info.config.max_bytes, info.config.max_msgs_per_subject) == (3600.0, 8 << 20, 3)
        # The limits are live: a workflow's subject keeps only its newest max_msgs_per_subject.
        subj = subject(unique_cluster, 1, "wf-limits")
        for i in range(5):
            await js.publish(subj, f"m{i}".encode())
        info = await js.stream_info(cfg.name)
        assert info.state.messages == 3
        assert (await js.get_last_msg(cfg.name, subj)).data == b"m4"
        # Verifying against another configuration names every differing limit.
        other = replace(cfg, max_age=7200.0, max_bytes=16 << 20, max_msgs_per_subject=10)
        mismatches = (await verify_stream(js, other, cluster=unique_cluster)).mismatches
        assert mismatches == ("max-age is 3600s, configured 7200s", f"max-bytes is {8 << 20}, configured {16 << 20}",
                              "max-msgs-per-subject is 3, configured 10")
    finally:
        await nc.close()


async def test_existing_unlimited_stream_is_reported_not_changed(shared_nats, unique_cluster: str) -> None:
    cfg = StreamConfig(name=default_stream_name(unique_cluster))
    nc = await nats.connect(shared_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(replace(desired_config(cfg, cluster=unique_cluster), max_age=0, max_bytes=-1,
                                    max_msgs_per_subject=-1))
        status = await ensure_stream(js, cfg, cluster=unique_cluster)
        assert not status.created
        assert [m.split(" is ")[0] for m in status.mismatches] == ["max-age", "max-bytes", "max-msgs-per-subject"]
        assert all("unlimited" in m for m in status.mismatches)
        info = await js.stream_info(cfg.name)  # ensure_stream never modifies an existing stream
        assert info.config.max_bytes in (None, -1) and not info.config.max_age
    finally:
        await nc.close()
