"""The chaos tests use the integration tests' agent stack (tests/integration/conftest.py:
``config_path`` .. ``bus_agents``, varied by ``stack_options``); a conftest applies only to its
own directory, so the fixtures are made visible here by name."""

from tests.integration.conftest import (  # noqa: F401 - fixtures, found by pytest by name
    agents,
    bus_agents,
    config_path,
    coord,
    ctx,
    guard,
    queue,
    redis_c,
    stack_options,
)
