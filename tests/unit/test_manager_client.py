"""integration-manager client without a server: the refresh path, and a manager nobody answers for.
Against a real local HTTP server with scripted answers: tests/integration/test_manager_client.py."""

from shared.manager_client import IntegrationManagerClient, refresh_path
from tests.support.helpers import MANAGER_TOKEN
from tests.support.network import closed_port


def test_unreachable_manager_is_a_retryable_network_error():
    client = IntegrationManagerClient(f"http://127.0.0.1:{closed_port()}", MANAGER_TOKEN, 1.0, 1.0)
    outcome = client.refresh_connection("i", "c", "t")
    assert (outcome.error_code, outcome.retryable, outcome.http_status) == ("network_error", True, None)
    assert MANAGER_TOKEN not in outcome.error_message


def test_refresh_path_encodes_each_id_as_one_segment():
    assert refresh_path("a/b", "c d") == "/api/v1/integrations/a%2Fb/connections/c%20d/refresh"
