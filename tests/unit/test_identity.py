"""Identity only in Azure: which credential each client is built with, at the SDK boundary (no
connection is made; the SDK constructors are recorded, the credential objects are the real ones)."""

import azure.cosmos
from azure.identity import DefaultAzureCredential

from shared.connection_store import cosmos_client_from_settings
from shared.messaging import ServiceBusTransport
from shared.settings import load_settings

ACCOUNT = "https://platform-cosmos.documents.azure.com:443/"


class RecordingCosmosClient:
    def __init__(self, url, credential, **kwargs):
        self.url, self.credential, self.kwargs = url, credential, kwargs


def test_cosmos_without_a_key_uses_the_managed_identity(monkeypatch):
    monkeypatch.setattr(azure.cosmos, "CosmosClient", RecordingCosmosClient)
    client = cosmos_client_from_settings(load_settings({"COSMOS_ENDPOINT": ACCOUNT}))
    assert client.url == ACCOUNT
    assert isinstance(client.credential, DefaultAzureCredential)


def test_cosmos_with_a_key_uses_the_key(monkeypatch):
    monkeypatch.setattr(azure.cosmos, "CosmosClient", RecordingCosmosClient)
    client = cosmos_client_from_settings(load_settings({"COSMOS_ENDPOINT": ACCOUNT, "COSMOS_KEY": "a2V5"}))
    assert client.credential == "a2V5"


def test_service_bus_namespace_setting_uses_the_managed_identity_as_deployed():
    # scripts/deploy.sh sets ServiceBusConnection__fullyQualifiedNamespace (and no connection string).
    settings = load_settings({"ServiceBusConnection__fullyQualifiedNamespace": "tr-bus.servicebus.windows.net"})
    transport = ServiceBusTransport.from_settings(settings)
    assert isinstance(transport._client._credential, DefaultAzureCredential)
    assert transport._client.fully_qualified_namespace == "tr-bus.servicebus.windows.net"
