"""integration-manager client against a real local HTTP server with scripted answers (the stand-in
manager, the `manager` fixture)."""

import threading
from urllib.parse import quote

import pytest

from localdev.stand_in_manager import Answer, StandInManager
from shared.manager_client import IntegrationManagerClient
from tests.support.helpers import MANAGER_TOKEN


def client_for(server, token=MANAGER_TOKEN, read_timeout_s=5.0, base_path=""):
    return IntegrationManagerClient(server.url + base_path, token, connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


@pytest.mark.parametrize(
    ("integration_id", "connection_id"),
    [
        ("salesforce", "conn-1"),
        ("sales/force", "conn/../../admin"),
        ("a?b=c", "d#e"),
        ("100%", "%2e%2e"),
        ("with space", "tab\tand\nnewline"),
        ("ünïcødé-集成", "接続-😀"),
        ("..a", "a.."),
        ("semi;colon", "back\\slash"),
        ("x" * 300, "y" * 1000),
    ],
)
def test_any_id_reaches_exactly_the_refresh_endpoint_with_the_same_ids(manager, integration_id, connection_id):
    outcome = client_for(manager).refresh_connection(integration_id, connection_id, "tenant-1")
    assert outcome.succeeded
    [call] = manager.calls
    assert call.raw_path == (
        f"/api/v1/integrations/{quote(integration_id, safe='')}/connections/{quote(connection_id, safe='')}/refresh"
    )
    assert (call.integration_id, call.connection_id) == (integration_id, connection_id)


@pytest.mark.parametrize(
    ("integration_id", "connection_id"), [("..", "c"), ("i", "."), ("i", ".."), ("", "c"), ("i", "...")]
)
def test_ids_that_are_only_dots_or_empty_are_refused_without_a_call(manager, integration_id, connection_id):
    outcome = client_for(manager).refresh_connection(integration_id, connection_id, "t")
    assert not outcome.succeeded
    assert outcome.error_code == "invalid_connection_id"
    assert outcome.retryable is False
    assert manager.calls == []


def test_sends_bearer_token_tenant_and_json_body(manager):
    client_for(manager).refresh_connection("i", "c", "tenant-7")
    [call] = manager.calls
    assert call.headers["Authorization"] == f"Bearer {MANAGER_TOKEN}"
    assert call.headers["X-Tenant-Id"] == "tenant-7"
    assert call.body == {"tenantId": "tenant-7"}


def test_no_authorization_header_without_a_token(manager):
    client_for(manager, token=None).refresh_connection("i", "c", "t")
    assert "Authorization" not in manager.calls[0].headers


def test_base_url_path_prefix_is_kept(manager):
    # The stand-in only answers /api/v1/...: a prefix shows up as a 404 with the prefixed path recorded.
    outcome = client_for(manager, base_path="/im").refresh_connection("i", "c", "t")
    assert manager.calls[0].raw_path == "/im/api/v1/integrations/i/connections/c/refresh"
    assert outcome.http_status == 404


def test_success_reports_new_expiry_when_the_api_returns_one(manager):
    manager.script = lambda call: Answer(200, {"data": {"oauth": {"expiresAt": 1_800_000_000_000}}})
    outcome = client_for(manager).refresh_connection("i", "c", "t")
    assert outcome.succeeded
    assert outcome.expires_at.year == 2027


@pytest.mark.parametrize(
    ("status", "body", "code", "retryable"),
    [
        (400, {"error": "invalid_grant", "error_description": "Token has been revoked"}, "invalid_grant", False),
        (401, {"message": "unauthorized"}, "unauthorized", True),  # about us (the token), not the connection
        (404, None, "endpoint_not_found", True),  # a wrong base path, not a missing connection
        (409, {"error": {"code": "refresh_in_progress"}}, "refresh_in_progress", True),
        (408, None, "timeout", True),
        (429, {"error": "rate_limited"}, "rate_limited", True),
        (500, "<html>oops</html>", "server_error", True),
        (502, None, "server_error", True),
        (503, {"code": "x" * 500}, "server_error", True),
    ],
)
def test_http_failures_are_classified(manager, status, body, code, retryable):
    manager.script = lambda call: Answer(status, body)
    outcome = client_for(manager).refresh_connection("i", "c", "t")
    assert not outcome.succeeded
    assert (outcome.http_status, outcome.error_code, outcome.retryable) == (status, code, retryable)
    assert outcome.error_message.startswith(f"integration-manager answered HTTP {status}")


def test_error_bodies_are_never_echoed(manager):
    manager.script = lambda call: Answer(400, {"error": "bad", "error_description": f"token {MANAGER_TOKEN} leaked"})
    outcome = client_for(manager).refresh_connection("i", "c", "t")
    assert MANAGER_TOKEN not in outcome.error_message


def test_redirects_are_not_followed(manager):
    with StandInManager() as elsewhere:
        manager.script = lambda call: Answer(307, None, {"Location": elsewhere.url + "/steal"})
        outcome = client_for(manager).refresh_connection("i", "c", "t")
        assert elsewhere.calls == []
    assert (outcome.succeeded, outcome.error_code, outcome.retryable) == (False, "redirect_refused", True)
    assert not outcome.about_connection and not outcome.transient  # a wrong URL: not retried, not held against it


def test_slow_manager_times_out_as_retryable(manager):
    manager.script = lambda call: Answer(200, {}, delay_s=1.5)
    outcome = client_for(manager, read_timeout_s=0.3).refresh_connection("i", "c", "t")
    assert (outcome.error_code, outcome.retryable) == ("timeout", True)


def test_huge_success_body_still_counts_as_success(manager):
    manager.script = lambda call: Answer(200, {"padding": "x" * 1_000_000})
    outcome = client_for(manager).refresh_connection("i", "c", "t")
    assert outcome.succeeded and outcome.expires_at is None


def test_one_client_reuses_one_connection(manager):
    client = client_for(manager)
    for n in range(50):
        assert client.refresh_connection("i", f"c{n}", "t").succeeded
    assert manager.sockets_accepted == 1


def test_concurrent_invocations_reuse_pooled_connections(manager):
    # 16 invocations at once (host.json maxConcurrentCalls): a pool smaller than that opens and
    # drops a connection for every call above its size.
    manager.script = lambda call: Answer(200, {}, delay_s=0.02)
    client = client_for(manager)
    barrier = threading.Barrier(16)

    def invocations() -> None:
        for _ in range(10):
            barrier.wait(timeout=10)  # all 16 in flight together, every round
            outcome = client.refresh_connection("i", "c", "t")
            assert outcome.succeeded, outcome

    threads = [threading.Thread(target=invocations) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(manager.calls) == 160
    assert manager.sockets_accepted <= 16
