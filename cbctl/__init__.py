"""cbctl: staged rollout of cluster coordination, lane fencing and the canonical event bus."""

__version__ = "0.1.0"
