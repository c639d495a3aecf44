"""Connection documents for the benchmarks, shaped as the platform stores them (docs/settings.md)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any


def seed(container: Any, count: int, prefix: str = "c") -> None:
    """Upsert `count` active connections expiring within the next half hour (8 requests in flight)."""
    from shared.times import format_time, utc_now

    now = utc_now()

    def one(n: int) -> None:
        container.upsert_item(
            {
                "id": f"{prefix}-{n:06d}",
                "tenantId": f"tenant-{n % 50}",
                "integrationId": ("salesforce", "google", "hubspot", "slack")[n % 4],
                "status": "active",
                "oauth": {
                    "accessToken": "a" * 40,
                    "refreshToken": "r" * 40,
                    "expiresAt": format_time(now + timedelta(seconds=n % 1800)),
                },
            }
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))
