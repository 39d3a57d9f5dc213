"""Helpers the integration and chaos tests share (no fixtures: those live in the conftest files).

One module per kind of thing: ``agent_process`` (a real ``cbctl agent run``), ``records`` (node
records, lane owners, the last preflight in the store), ``rollout`` (commits of flags and stages,
waiting for agents to apply them), ``workload`` (exactly-once checks on the Redis history and
the stream), ``sse`` (a real SSE subscriber), ``metrics`` (reading samples), ``prometheus`` (an
exporter for a real Prometheus to scrape), ``events`` (events and bridge subscriptions).
"""
