"""Shared core of cbctl and the node agent.

Nothing in this package imports typer or rich: the CLI depends on core, never the reverse.
"""
