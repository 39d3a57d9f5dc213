"""cbctl entry point (placeholder; the command tree is being built)."""


def run() -> None:
    raise SystemExit("cbctl: command tree not built yet")
