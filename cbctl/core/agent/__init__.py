"""The node agent: what runs on every node (never imported by the operator side)."""
