"""Failing chosen requests at the Cosmos-compatible server, for the crash-point and guarantee tests.

localdev/cosmos_server.js answers ``POST/GET/DELETE /_faults`` (nothing outside the tests calls these
paths); ``CosmosFaults`` is the tests' client of that hook."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

from localdev.local_services import HOST, CosmosServer


class CosmosFaults:
    """The fault hook of one running ``CosmosServer``."""

    def __init__(self, server: CosmosServer):
        self.server = server

    def inject_fault(
        self,
        *,
        method: str | None = None,
        path: str | None = None,
        partition_key: str | None = None,
        status: int = 500,
        times: int = 1,
        skip: int = 0,
        kill_pid: int | None = None,
        when: str = "before",
    ) -> None:
        """Make the next `times` requests matching `method`, the `path` regex (the decoded URL) and
        the `partition_key` regex (the partition key header) fail with `status` (`times=-1`: all of
        them, until `clear_faults()`), after letting `skip` of them pass. With `kill_pid`, SIGKILL
        that process instead: `when`="before" the request takes effect, or "after" it took effect but
        before the answer is sent. Tests use it to fail one step of a refresh at the server."""
        rule: dict[str, Any] = {
            "method": method,
            "path": path,
            "partitionKey": partition_key,
            "status": status,
            "times": times,
            "skip": skip,
        }
        if kill_pid is not None:
            rule |= {"action": "kill", "pid": kill_pid, "when": when}
        self._admin("POST", json.dumps({k: v for k, v in rule.items() if v is not None}).encode())

    def clear_faults(self) -> None:
        self._admin("DELETE", b"")

    def faults(self) -> list[dict[str, Any]]:
        """The rules still armed, each with its `hits` so far (a rule whose `times` ran out is gone)."""
        return json.loads(self._admin("GET", b""))

    def _admin(self, method: str, body: bytes) -> bytes:
        context = ssl._create_unverified_context()  # noqa: S323 - the local server's self-signed certificate
        connection = http.client.HTTPSConnection(HOST, self.server.port, context=context, timeout=10)
        try:
            connection.request(method, "/_faults", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status >= 300:
                raise RuntimeError(f"Cosmos server refused the fault rule: {answer[:200]!r}")
            return answer
        finally:
            connection.close()
