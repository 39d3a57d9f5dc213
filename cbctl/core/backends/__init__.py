"""The edges to libraries (coordination store, Redis, NATS, Prometheus); each converts its library's errors into cbctl.core.model.errors."""
