"""An expiry is an instant, whatever form and precision its document stores it in: the refresh step must recognise
the expiry a request was made for, or it skips the request as "refreshed since" and the token expires unrefreshed."""

from datetime import UTC, datetime, timedelta

import pytest

from shared.connection_store import ConnectionState
from shared.events import RefreshRequestedData, make_event
from shared.times import parse_expires_at
from shared.token_refresh import expiry_moved_forward

INSTANT = datetime(2026, 12, 6, 5, 31, 28, 123456, tzinfo=UTC)

STORED_FORMS = {
    ".NET, 7 fraction digits": "2026-12-06T05:31:28.1234567Z",
    "Python isoformat, 6 digits": "2026-12-06T05:31:28.123456Z",
    "Python isoformat with offset": "2026-12-06T05:31:28.123456+00:00",
    "4 digits": "2026-12-06T05:31:28.1234Z",
    "lower-case t and z": "2026-12-06t05:31:28.1234567z",
    "fractional epoch ms": INSTANT.timestamp() * 1000,
    "fractional epoch s": INSTANT.timestamp(),
}


def as_carried_by_a_request(stored):
    """The request the check publishes for a document with this expiry, as the refresh step parses it."""
    data = RefreshRequestedData(
        connection_id="c-1",
        integration_id="zoom",
        tenant_id="t-1",
        expires_at=parse_expires_at(stored),
        requested_at=INSTANT,
    )
    return RefreshRequestedData.model_validate(make_event(data).data)


@pytest.mark.parametrize("stored", STORED_FORMS.values(), ids=STORED_FORMS)
def test_a_document_whose_expiry_did_not_change_is_not_taken_as_refreshed(stored):
    # Was: the request carried the expiry cut to milliseconds, so the re-read always looked later and every such
    # connection was skipped as "refreshed since the request", with no call and no event, at every check.
    request = as_carried_by_a_request(stored)
    assert expiry_moved_forward(request, ConnectionState("active", stored, 1)) is None


@pytest.mark.parametrize("stored", STORED_FORMS.values(), ids=STORED_FORMS)
def test_a_document_whose_expiry_moved_by_a_millisecond_is_taken_as_refreshed(stored):
    request = as_carried_by_a_request(stored)
    later = (parse_expires_at(stored) + timedelta(milliseconds=1)).isoformat()
    assert expiry_moved_forward(request, ConnectionState("active", later, 2)) is not None


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (1796535088, datetime.fromtimestamp(1796535088, UTC)),  # epoch seconds: 2026, not 1970
        (1796535088853, datetime.fromtimestamp(1796535088.853, UTC)),  # epoch milliseconds
        (1796535088853.5, datetime.fromtimestamp(1796535088.8535, UTC)),
    ],
)
def test_epoch_numbers_are_read_as_seconds_or_milliseconds_by_their_magnitude(stored, expected):
    assert parse_expires_at(stored) == expected
    assert parse_expires_at(stored).year == 2026
