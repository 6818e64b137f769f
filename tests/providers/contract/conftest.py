"""The provider contract suite runs every test once per registered provider, each against
its own simulator over HTTP (providers.simulators.kits), with the suite's one worker
process (tests/conftest.py `worker`) and real PostgreSQL and Redis."""
from __future__ import annotations

import pytest

from providers import REGISTRY
from providers.simulators.kits import KITS
from tests.chaos.conftest import broker, chaos  # noqa: F401  (the worker-kill case)


@pytest.fixture(params=sorted(REGISTRY))
def psim(request):
    server = KITS[request.param].start()
    yield server
    server.stop()


@pytest.fixture()
def pworld(db_clean, psim):
    """An account connected to this provider's simulator, with its target statuses set."""
    from tests.factories import World

    return World.create(psim)
