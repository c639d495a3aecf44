"""The unit layer runs on a machine with only Python: no RabbitMQ, no Cosmos-compatible server, no
Azurite, no npm, no Azure CLI. tests/conftest.py refuses a unit test that asks for a service fixture;
this refuses one that starts a service (or the stand-in manager, or the real worker) by itself."""

import pytest

from localdev.local_services import Azurite, CosmosServer, RabbitMQ
from localdev.stand_in_manager import StandInManager
from tests.support.functions_worker import FunctionsWorker


@pytest.fixture(autouse=True)
def no_services(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(
            f"a unit test started {type(self).__name__}: unit tests use no services "
            "(tests that need one live in tests/integration or tests/e2e)"
        )

    for service in (RabbitMQ, CosmosServer, Azurite, FunctionsWorker):
        monkeypatch.setattr(service, "start", refuse)
    monkeypatch.setattr(StandInManager, "__init__", refuse)
