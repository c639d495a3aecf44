"""HTTP sessions whose connection pool fits the invocations one worker process runs at once.

requests keeps 10 connections per host by default. With more concurrent invocations than that
(host.json maxConcurrentCalls is 16; the local host's --workers), every
request above the tenth opens a new TCP (and TLS) connection and drops it afterwards: slower, and
for Cosmos DB and integration-manager a new handshake per call. Idle pool slots cost nothing:
connections are opened only when that many requests are in flight together.
"""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

HTTP_POOL_SIZE = 32  # >= invocations per process at once (host.json allows 16, plus headroom)


def pooled_session(*, trust_env: bool, max_retries: Retry | int = 0) -> requests.Session:
    """A session keeping up to HTTP_POOL_SIZE connections per host. `trust_env` decides whether
    proxy variables apply; `max_retries` is urllib3's (callers own their retry policies)."""
    session = requests.Session()
    session.trust_env = trust_env
    adapter = HTTPAdapter(pool_maxsize=HTTP_POOL_SIZE, max_retries=max_retries)
    for scheme in ("http://", "https://"):
        session.mount(scheme, adapter)
    return session
