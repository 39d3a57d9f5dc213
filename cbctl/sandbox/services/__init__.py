"""One module per service kind the sandbox and the test fixtures start (one harness).

:mod:`~cbctl.sandbox.services.base` holds the process contract every service keeps.
"""
