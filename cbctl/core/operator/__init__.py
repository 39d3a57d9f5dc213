"""The operator side: control plane, preflight, gates, exit criteria, runbooks, signal sender, SSE client."""
