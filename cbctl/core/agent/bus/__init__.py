"""The agent's side of the event bus: outbox, publisher, bridge, local stream, SSE server."""
