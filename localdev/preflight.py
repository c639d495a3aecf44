"""Before a command starts work: the Cosmos database and connections container it reads exist and answer, with the
key as given. A command that cannot work then stops with one line (localdev/failures.py) before it publishes or
consumes anything, instead of failing every message it takes (`run`) or the middle of its output (`check`)."""

from __future__ import annotations

from localdev.errors import ServiceError
from localdev.failures import cosmos_address
from shared import runtime
from shared.settings import Settings

CREATE_IT = "`make services-up` creates the local one and seeds it"


def require_connections_container(settings: Settings) -> None:
    """Read the database's and the container's properties. A missing one is a ServiceError naming it and its
    setting; an unreachable server or an unusable key propagates as the SDK raised it (explained by the CLI)."""
    from azure.cosmos.exceptions import CosmosResourceNotFoundError

    database = runtime.cosmos_client().get_database_client(settings.cosmos_database)
    try:
        database.read()
    except CosmosResourceNotFoundError:
        raise ServiceError(
            f"Cosmos DB has no database '{settings.cosmos_database}'",
            f"{cosmos_address(settings)}, COSMOS_DATABASE",
            f"fix COSMOS_DATABASE or create the database ({CREATE_IT})",
        ) from None
    try:
        database.get_container_client(settings.cosmos_connections_container).read()
    except CosmosResourceNotFoundError:
        raise ServiceError(
            f"Cosmos DB database '{settings.cosmos_database}' has no container "
            f"'{settings.cosmos_connections_container}'",
            f"{cosmos_address(settings)}, COSMOS_CONNECTIONS_CONTAINER",
            f"fix COSMOS_CONNECTIONS_CONTAINER or create the container ({CREATE_IT})",
        ) from None
