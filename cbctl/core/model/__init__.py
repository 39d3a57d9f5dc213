"""The shared model: pure contract, no I/O (flags, stages, the rollout document, records, events, key layout, errors, durations, config)."""
