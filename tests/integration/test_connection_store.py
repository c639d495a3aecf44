"""Selecting expiring connections from a real Cosmos-compatible server."""

import logging
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.connection_store import EXPIRING_CONNECTIONS_QUERY, ConnectionStore, expiring_connections_query
from shared.settings import DEFAULT_SKIP_STATUSES
from tests.support.helpers import iso

NOW = datetime.now(UTC).replace(microsecond=0)
THRESHOLD = NOW + timedelta(hours=1)


def doc(doc_id, expires_at=..., status="active", **extra):
    document = {"id": doc_id, "tenantId": extra.pop("tenantId", "t-1"), "integrationId": "salesforce", "status": status}
    document["oauth"] = {"accessToken": f"at-{doc_id}", "refreshToken": f"rt-{doc_id}"}
    if expires_at is not ...:
        document["oauth"]["expiresAt"] = expires_at
    document.update(extra)
    return document


DUE = [
    doc("iso-ms-z", iso(NOW + timedelta(minutes=10))),
    doc("iso-no-ms", (NOW + timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M:%SZ")),
    doc("iso-plus-zero", (NOW + timedelta(minutes=30)).isoformat()),
    doc("iso-offset-ahead", (NOW + timedelta(minutes=40)).astimezone(timezone(timedelta(hours=9))).isoformat()),
    doc("iso-offset-behind", (NOW + timedelta(minutes=50)).astimezone(timezone(timedelta(hours=-7))).isoformat()),
    doc("iso-naive-utc", (NOW + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")),
    doc("epoch-ms", int((NOW + timedelta(minutes=15)).timestamp() * 1000)),
    doc("epoch-ms-float", (NOW + timedelta(minutes=16)).timestamp() * 1000 + 0.5),
    doc("already-expired", iso(NOW - timedelta(days=3))),
    doc("exactly-at-threshold", iso(THRESHOLD)),
    doc("status-null", iso(NOW), status=None),
    doc("status-missing", iso(NOW), status=...),
    doc("status-expired", iso(NOW), status="expired"),
    doc("other-tenant", iso(NOW), tenantId="t-2"),
    doc("numeric-integration", iso(NOW), integrationId=42),
    doc("dotnet-7-digit-fraction", "2026-01-01T00:00:00.1234567Z"),
    doc("space-separated", (NOW + timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%SZ")),
    # Text comparison put these after the bound: a lower-case separator sorts after every upper-case time of its day.
    doc("lower-case-t-and-z", (NOW + timedelta(minutes=2)).strftime("%Y-%m-%dt%H:%M:%S.1234567z")),
    # Epoch seconds, read by magnitude (they were read as milliseconds: 1970, due at every check).
    doc("epoch-seconds", int((NOW + timedelta(minutes=17)).timestamp())),
    doc("epoch-seconds-float", (NOW + timedelta(minutes=18)).timestamp() + 0.25),
]
NOT_DUE = [
    doc("iso-later", iso(THRESHOLD + timedelta(milliseconds=1))),
    doc("iso-offset-later", (THRESHOLD + timedelta(hours=2)).astimezone(timezone(timedelta(hours=14))).isoformat()),
    doc("epoch-later", int((THRESHOLD + timedelta(minutes=1)).timestamp() * 1000)),
    doc("epoch-seconds-later", int((THRESHOLD + timedelta(minutes=1)).timestamp())),
    doc("lower-case-later", (THRESHOLD + timedelta(minutes=1)).strftime("%Y-%m-%dt%H:%M:%Sz")),
    doc("revoked", iso(NOW), status="revoked"),
    doc("revoked-capitalised", iso(NOW), status="Revoked"),
    doc("disabled", iso(NOW), status="disabled"),
    doc("deleted", iso(NOW), status="deleted"),
    doc("no-expiry"),
    doc("null-expiry", None),
    doc("bool-expiry", True),
    doc("object-expiry", {"at": iso(NOW)}),
    {"id": "no-oauth", "tenantId": "t-1", "integrationId": "apikey-thing", "status": "active"},
]
INVALID = [
    doc("garbage-expiry", "0000-garbage"),
    # Text that is no time sorts after every digit: the scan once never saw it, so nothing said it was unusable.
    doc("garbage-expiry-later", "zzz-not-a-date"),
    doc("word-expiry", "soon"),
    doc("missing-integration", iso(NOW), integrationId=None),
    doc("boolean-integration", iso(NOW), integrationId=True),
    doc("boolean-tenant", iso(NOW), tenantId=False),
    doc("numeric-tenant", iso(NOW), tenantId=7),
]


@pytest.fixture
def seeded(cosmos_container):
    for document in DUE + NOT_DUE + INVALID:
        cosmos_container.upsert_item({k: v for k, v in document.items() if v is not ...})
    return cosmos_container


def scan(container, page_size=100, skip=DEFAULT_SKIP_STATUSES):
    pages = list(ConnectionStore(container, page_size).expiring_connection_pages(THRESHOLD, skip))
    return pages, {c.connection_id: c for page in pages for c in page.connections}


def test_selects_exactly_the_due_connections_in_every_stored_form(seeded):
    pages, found = scan(seeded)
    assert sorted(found) == sorted(d["id"] for d in DUE)
    assert sum(page.invalid for page in pages) == len(INVALID)


def test_expiry_is_normalised_to_the_same_instant_whatever_the_stored_form(seeded):
    _, found = scan(seeded)
    assert found["iso-offset-ahead"].expires_at == NOW + timedelta(minutes=40)
    assert found["epoch-ms"].expires_at == NOW + timedelta(minutes=15)
    assert found["epoch-seconds"].expires_at == NOW + timedelta(minutes=17)
    assert found["lower-case-t-and-z"].expires_at == NOW + timedelta(minutes=2, microseconds=123456)
    assert found["iso-naive-utc"].expires_at == NOW + timedelta(minutes=5)
    assert found["numeric-integration"].integration_id == "42"


def test_pages_with_continuation_tokens_cover_everything_once(seeded):
    pages, _ = scan(seeded, page_size=3)
    assert len(pages) > 3
    ids = [c.connection_id for page in pages for c in page.connections]
    assert len(ids) == len(set(ids)) == len(DUE)
    resumed = list(
        ConnectionStore(seeded, 3).expiring_connection_pages(THRESHOLD, DEFAULT_SKIP_STATUSES, pages[1].continuation)
    )
    resumed_ids = [c.connection_id for page in resumed for c in page.connections]
    assert resumed_ids == ids[len(ids) - len(resumed_ids) :]
    assert len(resumed_ids) < len(ids)


def test_skip_statuses_are_configurable(seeded):
    _, found = scan(seeded, skip=("revoked", "expired"))
    assert "disabled" in found and "deleted" in found
    assert "status-expired" not in found and "revoked" not in found


def test_the_query_never_reads_token_values(seeded):
    for query in (expiring_connections_query(False), expiring_connections_query(True)):
        projection = query.split(" WHERE ")[0]
        assert "Token" not in projection and "*" not in projection
    assert "Token" not in EXPIRING_CONNECTIONS_QUERY
    rows = list(
        seeded.query_items(
            EXPIRING_CONNECTIONS_QUERY,
            parameters=[
                {"name": "@thresholdTextBound", "value": iso(THRESHOLD)},
                {"name": "@thresholdEpochMs", "value": int(THRESHOLD.timestamp() * 1000)},
                {"name": "@skipStatuses", "value": []},
            ],
            enable_cross_partition_query=True,
        )
    )
    assert rows
    assert all(set(row) <= {"id", "tenantId", "integrationId", "status", "expiresAt", "_ts"} for row in rows)


def test_concurrent_invocations_reuse_pooled_cosmos_connections(cosmos_server, cosmos_container, caplog):
    # 16 invocations at once (host.json maxConcurrentCalls) each re-read a connection: with the
    # SDK's default pool of 10, every read above the tenth would open and drop a TLS connection.
    from shared.connection_store import cosmos_client_from_settings
    from shared.settings import load_settings

    cosmos_container.upsert_item(doc("c-1", iso(NOW)))
    settings = load_settings(
        {"COSMOS_ENDPOINT": cosmos_server.endpoint, "COSMOS_KEY": cosmos_server.key, "COSMOS_EMULATOR": "true"}
    )
    client = cosmos_client_from_settings(settings)
    database = client.get_database_client(cosmos_container.container_link.split("/")[1])
    store = ConnectionStore(database.get_container_client(cosmos_container.id))
    barrier = threading.Barrier(16)
    states = []

    def invocations() -> None:
        for _ in range(5):
            barrier.wait(timeout=10)
            states.append(store.current_state("t-1", "c-1"))

    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    threads = [threading.Thread(target=invocations) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(states) == 80
    assert all(state is not None and state.status == "active" for state in states)
    opened = [record for record in caplog.records if "Starting new HTTPS connection" in record.getMessage()]
    assert len(opened) <= 16, len(opened)


def test_every_unusable_expiry_is_logged_at_every_scan(seeded, caplog):
    with caplog.at_level(logging.WARNING, logger="shared.connection_store"):
        scan(seeded)
    for document in ("word-expiry", "garbage-expiry-later", "garbage-expiry"):
        assert f"Skipping connection '{document}': oauth.expiresAt is not an ISO-8601 time" in caplog.text
