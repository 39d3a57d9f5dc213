"""Runbooks: on-call procedures as data (``runbooks/*.yaml``): model, parser, executor and run
records (store). Format and rules: docs/operator.md."""
