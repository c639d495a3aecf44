"""A large mixed fleet of connections, as the platform stores them (tests/e2e/test_end_to_end.py runs a
cycle over it through the local host, tests/integration/test_real_worker.py through the real worker)."""

import random
import uuid
from datetime import datetime, timedelta

from tests.support.helpers import iso

CANARY = "canary-" + uuid.uuid4().hex  # in every token of the fleet: finding it in any output is a leak


def build_fleet(now: datetime, size: int = 1200, seed: int = 7):
    """A mixed fleet: due (ISO strings and epoch ms, odd ids), not yet due, and not refreshable."""
    rng = random.Random(seed)
    # Cosmos ids cannot hold / \\ ? #, so those go into integration ids, which are free text.
    odd_ids = ["100%", "%2e%2e", "sp ace", "ünï-😀", "..a", "a..", "semi;colon", "x" * 255]
    odd_integrations = ["with/slash", "q?x=1", "hash#frag", "a/../../admin", "..", "sp ace"]
    documents, due, rejected, flaky, dots = [], set(), set(), set(), set()
    for n in range(size):
        kind = rng.random()
        conn_id = odd_ids[n] if n < len(odd_ids) else f"conn-{n:05d}"
        tenant = f"tenant-{n % 13}"
        integration = rng.choice(["salesforce", "google", "hubspot", "slack"])
        if len(odd_ids) <= n < len(odd_ids) + len(odd_integrations):
            integration = odd_integrations[n - len(odd_ids)]
        status = "active"
        if kind < 0.65:
            expiry = now + timedelta(seconds=rng.randint(-86_400, 3_800))
            due.add(conn_id)
            if rng.random() < 0.1:
                rejected.add(conn_id)
            elif rng.random() < 0.05:
                flaky.add(conn_id)
        elif kind < 0.9:
            expiry = now + timedelta(seconds=rng.randint(4_000, 90 * 86_400))
        else:
            expiry = now - timedelta(minutes=5)
            status = rng.choice(["revoked", "disabled", "deleted", "Revoked"])
        if conn_id in due and set(integration) == {"."}:
            due.discard(conn_id)
            rejected.discard(conn_id)
            flaky.discard(conn_id)
            dots.add(conn_id)
        stored = iso(expiry) if rng.random() < 0.7 else int(expiry.timestamp() * 1000)
        documents.append(
            {
                "id": conn_id,
                "tenantId": tenant,
                "integrationId": integration,
                "status": status,
                "oauth": {"accessToken": f"at-{CANARY}-{n}", "refreshToken": f"rt-{CANARY}-{n}", "expiresAt": stored},
            }
        )
    # Ids made only of dots cannot be addressed safely: they must end as failed events, never as calls.
    for dot_id in ("..", "."):
        documents.append(
            {
                "id": dot_id,
                "tenantId": "tenant-x",
                "integrationId": "google",
                "status": "active",
                "oauth": {"accessToken": f"at-{CANARY}", "refreshToken": f"rt-{CANARY}", "expiresAt": iso(now)},
            }
        )
        dots.add(dot_id)
    return documents, due, rejected, flaky, dots
