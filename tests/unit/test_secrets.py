"""No secret ever leaves the app: the scrubber masks every form a secret takes in a text (raw,
repr-escaped, percent-encoded, JSON-escaped...). Through the whole app against the real services:
tests/integration/test_secrets.py, tests/e2e/test_secrets.py."""

from urllib.parse import quote

import pytest

from shared.secrets import Scrubber
from shared.settings import load_settings
from tests.support.canaries import (
    CANARY,
    ODD_BROKER_PASSWORD,
    ODD_COSMOS_KEY,
    ODD_MANAGER_TOKEN,
    ODD_SERVICE_BUS_KEY,
    every_form,
)


@pytest.mark.parametrize(
    ("setting", "value", "secret"),
    [
        ("INTEGRATION_MANAGER_TOKEN", ODD_MANAGER_TOKEN, ODD_MANAGER_TOKEN),
        ("COSMOS_KEY", ODD_COSMOS_KEY, ODD_COSMOS_KEY),
        ("RABBITMQ_URL", f"amqp://app:{quote(ODD_BROKER_PASSWORD, safe='')}@rabbit:5672/", ODD_BROKER_PASSWORD),
        (
            "ServiceBusConnection",
            f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={ODD_SERVICE_BUS_KEY}",
            ODD_SERVICE_BUS_KEY,
        ),
    ],
)
@pytest.mark.parametrize("form", list(every_form("x")))
def test_the_scrubber_masks_every_form_of_every_secret_setting(setting, value, secret, form):
    scrub = Scrubber(load_settings({setting: value}))
    leaked = every_form(secret)[form]
    scrubbed = scrub(f"before {leaked} after", 10_000)
    assert "***" in scrubbed
    assert scrubbed.startswith("before ") and scrubbed.endswith(" after")
    assert CANARY not in scrubbed and leaked not in scrubbed and (form != "raw" or scrubbed == "before *** after")
