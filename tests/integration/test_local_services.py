"""The real local services start, answer their clients' SDKs and behave as the app relies on (free ports
and connects to a hanging broker, without services: tests/unit/test_local_services.py)."""

import uuid

import pika
import pytest
from azure.cosmos import CosmosClient, PartitionKey
from azure.cosmos.exceptions import CosmosResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from localdev.local_services import ServiceStartError

# The Cosmos SDK skips TLS verification for 127.0.0.1 on purpose (emulator); urllib3 warns on every request.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


# --- RabbitMQ ------------------------------------------------------------------------------------


def _publish_confirmed(channel, queue: str, body: bytes) -> None:
    # with confirm_delivery() on, basic_publish waits for the broker's ack and raises on nack/unroutable
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        body=body,
        properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, message_id="m-1"),
        mandatory=True,
    )


def test_rabbitmq_publish_with_confirm_round_trip(rabbitmq):
    assert rabbitmq.url == f"amqp://guest:guest@127.0.0.1:{rabbitmq.port}/%2F"
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = f"selftest.{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue, auto_delete=True)
        _publish_confirmed(channel, queue, b'{"hello": "rabbit"}')

        method, properties, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None
        assert body == b'{"hello": "rabbit"}'
        assert properties.message_id == "m-1"
        assert properties.delivery_mode == 2
        channel.queue_delete(queue)
    finally:
        connection.close()


def test_rabbitmq_restart_keeps_port_and_durable_messages(rabbitmq):
    queue = f"selftest.durable.{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue, durable=True)
    _publish_confirmed(channel, queue, b"survives a restart")
    connection.close()
    port, url = rabbitmq.port, rabbitmq.url

    rabbitmq.restart()

    assert (rabbitmq.port, rabbitmq.url) == (port, url)
    assert queue in rabbitmq.ctl("list_queues", "name", "--quiet", "--no-table-headers").split()
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = connection.channel()
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None
        assert body == b"survives a restart"
        channel.queue_delete(queue)
    finally:
        connection.close()


def test_rabbitmq_ctl_failure_names_the_command(rabbitmq):
    with pytest.raises(RuntimeError, match="no_such_command"):
        rabbitmq.ctl("no_such_command")


def test_start_on_a_busy_port_fails_with_a_clear_error(tmp_path, cosmos_server):
    from localdev.local_services import CosmosServer

    with pytest.raises(ServiceStartError, match=f"port.*{cosmos_server.port}.*already in use"):
        CosmosServer(tmp_path, port=cosmos_server.port).start()


# --- Cosmos DB-compatible server -----------------------------------------------------------------

THRESHOLD_ISO = "2026-11-26T15:00:00.000Z"
THRESHOLD_MS = 1_795_100_000_000  # 2026-11-18T...Z, any number works: the point is the type split

EXPIRING_QUERY = """
SELECT c.id, c.tenantId, c.integrationId, c.oauth.expiresAt AS expiresAt
FROM c
WHERE (IS_STRING(c.oauth.expiresAt) AND c.oauth.expiresAt <= @thresholdIso)
   OR (IS_NUMBER(c.oauth.expiresAt) AND c.oauth.expiresAt <= @thresholdMs)
"""


@pytest.fixture
def cosmos_container(cosmos_server):
    client = CosmosClient(cosmos_server.endpoint, credential=cosmos_server.key)
    database = client.create_database_if_not_exists("local_services_selftest")
    name = f"c_{uuid.uuid4().hex[:10]}"
    container = database.create_container(name, partition_key=PartitionKey(path="/tenantId"))
    yield container
    database.delete_container(name)


def _connection(number: int, expires_at) -> dict:
    doc = {
        "id": f"conn-{number}",
        "tenantId": f"t-{number % 3}",
        "integrationId": "salesforce",
        "status": "active",
        "oauth": {"accessToken": "secret-access", "refreshToken": "secret-refresh"},
    }
    if expires_at is not None:
        doc["oauth"]["expiresAt"] = expires_at
    return doc


def test_cosmos_cross_partition_query_with_type_checks_and_continuation(cosmos_container):
    docs = [
        _connection(1, "2026-11-26T14:00:00.000Z"),  # expiring (string)
        _connection(2, "2026-11-26T16:00:00.000Z"),  # not expiring
        _connection(3, THRESHOLD_MS - 1),  # expiring (epoch ms)
        _connection(4, THRESHOLD_MS + 1),  # not expiring
        _connection(5, None),  # no expiry
        _connection(6, "2026-11-26T15:00:00.000Z"),  # expiring (equal)
        _connection(7, "2026-01-01T00:00:00.000Z"),  # expiring
        _connection(8, 1_000),  # expiring (epoch ms)
    ]
    for doc in docs:
        cosmos_container.upsert_item(doc)
    parameters = [
        {"name": "@thresholdIso", "value": THRESHOLD_ISO},
        {"name": "@thresholdMs", "value": THRESHOLD_MS},
    ]

    def pages(continuation_token=None):
        return cosmos_container.query_items(
            EXPIRING_QUERY, parameters=parameters, enable_cross_partition_query=True, max_item_count=2
        ).by_page(continuation_token)

    first_pages = pages()
    first = list(next(first_pages))
    token = first_pages.continuation_token
    assert len(first) == 2
    assert token, "a first page of 2 out of 5 results must come with a continuation token"

    rest = [item for page in pages(token) for item in page]  # resume in a new iterator

    ids = [item["id"] for item in first + rest]
    assert sorted(ids) == ["conn-1", "conn-3", "conn-6", "conn-7", "conn-8"]
    assert len(ids) == len(set(ids))
    assert all(set(item) == {"id", "tenantId", "integrationId", "expiresAt"} for item in first + rest)


@pytest.mark.parametrize(
    ("where", "parameters", "expected"),
    [
        ("ENDSWITH(c.x, 'Z')", [], {"a", "c"}),
        ("LOWER(c.status) = 'active'", [], {"a"}),
        ("LEFT(c.x, 19) <= @t", [{"name": "@t", "value": "2026-11-26T15:00:00"}], {"a", "b", "c"}),
        (
            "IS_DEFINED(c.status) AND NOT ARRAY_CONTAINS(@skip, c.status)",
            [{"name": "@skip", "value": ["REVOKED"]}],
            {"a", "c"},
        ),
        (
            "IS_DEFINED(c.status) AND NOT ARRAY_CONTAINS(@skip, LOWER(c.status))",
            [{"name": "@skip", "value": ["revoked", "disabled"]}],
            {"a"},
        ),
    ],
)
def test_cosmos_server_evaluates_string_and_array_functions(cosmos_container, where, parameters, expected):
    # The server is not Cosmos DB: this pins down what the app's queries may rely on locally.
    # (Only defined values: how functions treat an undefined property is where emulators differ most.)
    for doc in [
        {"id": "a", "tenantId": "t1", "status": "Active", "x": "2026-11-26T15:00:00.000Z"},
        {"id": "b", "tenantId": "t2", "status": "REVOKED", "x": "2026-11-26T15:00:00+00:00"},
        {"id": "c", "tenantId": "t1", "status": "disabled", "x": "2026-11-26T15:00:00Z"},
        {"id": "d", "tenantId": "t3", "x": 5},
    ]:
        cosmos_container.upsert_item(doc)
    query = f"SELECT VALUE c.id FROM c WHERE {where}"  # noqa: S608 - test constants, values are parameters
    found = cosmos_container.query_items(query, parameters=parameters, enable_cross_partition_query=True)
    assert set(found) == expected


def test_cosmos_point_read_of_a_missing_document_is_404_like_real_cosmos(cosmos_container):
    # The package itself answers 500 here; localdev/cosmos_server.js makes it answer as Cosmos DB does.
    cosmos_container.upsert_item({"id": "present", "tenantId": "t1"})
    assert cosmos_container.read_item("present", partition_key="t1")["id"] == "present"
    for item_id, tenant in (("missing", "t1"), ("present", "t2")):
        with pytest.raises(CosmosResourceNotFoundError):
            cosmos_container.read_item(item_id, partition_key=tenant)


def test_cosmos_single_partition_query_sees_only_its_partition(cosmos_container):
    # Real Cosmos scopes a query with a partition key to that partition; the package scanned all of them.
    for item_id, tenant in (("same-id", "t1"), ("same-id", "t2"), ("other", "t1")):
        cosmos_container.upsert_item({"id": item_id, "tenantId": tenant})
    # (The package insists on a partition key filter in the text; this one matches every partition.)
    query = "SELECT c.id, c.tenantId FROM c WHERE c.tenantId = c.tenantId"
    scoped = cosmos_container.query_items(query, partition_key="t1")
    assert sorted((row["id"], row["tenantId"]) for row in scoped) == [("other", "t1"), ("same-id", "t1")]
    across = cosmos_container.query_items("SELECT VALUE c.tenantId FROM c", enable_cross_partition_query=True)
    assert sorted(across) == ["t1", "t1", "t2"]


# --- Azurite -------------------------------------------------------------------------------------


def test_azurite_blob_round_trip(azurite):
    assert "AccountName=devstoreaccount1" in azurite.connection_string
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.create_container(f"selftest-{uuid.uuid4().hex[:8]}")
    container.upload_blob("hello.txt", b"hello azurite")
    assert container.download_blob("hello.txt").readall() == b"hello azurite"
    container.delete_container()
