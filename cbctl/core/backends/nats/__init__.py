"""NATS: connecting, and the JetStream event stream."""
