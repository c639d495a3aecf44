"""An in-memory Cosmos container with the ContainerProxy methods the app calls (docs/simulation.md).

System fields as Cosmos keeps them: `_etag` (new on every write), `_ts` (epoch seconds of the virtual clock), `ttl`
per item over the container's `default_ttl` (an expired item is gone from reads and queries). Errors are the SDK's
own classes. Queries are not parsed: each query text the app sends is registered here with a Python function over
the stored items, so a changed query fails loudly (AssertionError naming it) instead of silently answering wrong.
Every call is first a yield point of the simulation (`gate`), which may run another actor, fail the call, or crash
the caller.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

from azure.core import MatchConditions
from azure.cosmos.exceptions import (
    CosmosAccessConditionFailedError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from shared.connection_store import expiring_connections_query

Item = dict[str, Any]
Params = dict[str, Any]
# The simulation's yield point: called before each operation with its label and the id it touches; it may raise
# (an outage, a crash) and returns whether the operation's answer is to be lost after it took effect.
Gate = Callable[[str, bool], bool]
QueryFunction = Callable[[list[Item], Params], list[Any]]


def _no_gate(label: str, write: bool) -> bool:
    return False


class MemoryContainer:
    """One container: items by id (the partition key is not modelled apart: every id the app uses is unique)."""

    def __init__(self, name: str, clock: Callable[[], float], default_ttl: int | None = None) -> None:
        self.name = name
        self._clock = clock
        self.default_ttl = default_ttl  # None: TTL off (item ttl ignored); -1: on, items expire only by their own
        self._items: dict[str, Item] = {}
        self._etags = 0
        self.gate: Gate = _no_gate
        self.gaps: list[str] = []  # unregistered query texts or predicates seen (the app may swallow the error)

    # Direct access for the simulation itself (no yield point, no fault) -------------------------------------------

    def peek(self, item_id: str) -> Item | None:
        """The live item as stored (a copy), None when missing or expired."""
        item = self._items.get(item_id)
        return None if item is None or self._expired(item) else copy.deepcopy(item)

    def live_items(self) -> list[Item]:
        """Every live item (copies), in id order."""
        return [copy.deepcopy(i) for _, i in sorted(self._items.items()) if not self._expired(i)]

    def put(self, body: Item) -> Item:
        """Write an item as another system would (the platform, integration-manager): new `_etag` and `_ts`."""
        return self._store(body)

    # ContainerProxy ------------------------------------------------------------------------------------------------

    def read_item(self, item: str | Item, partition_key: Any, **kwargs: Any) -> Item:
        """Point read; CosmosResourceNotFoundError when missing or expired."""
        item_id = _id_of(item)
        self.gate(f"{self.name}.read_item {item_id}", False)
        found = self.peek(item_id)
        if found is None:
            raise CosmosResourceNotFoundError(status_code=404, message=f"{item_id} not found")
        return found

    def create_item(self, body: Item, **kwargs: Any) -> Item:
        """Create; CosmosResourceExistsError when a live item has the id."""
        lose = self.gate(f"{self.name}.create_item {body['id']}", True)
        if self.peek(body["id"]) is not None:
            raise CosmosResourceExistsError(status_code=409, message=f"{body['id']} exists")
        return self._answer(self._store(body), lose)

    def upsert_item(self, body: Item, **kwargs: Any) -> Item:
        """Create or replace, unconditionally."""
        lose = self.gate(f"{self.name}.upsert_item {body['id']}", True)
        return self._answer(self._store(body), lose)

    def replace_item(
        self,
        item: str | Item,
        body: Item,
        *,
        etag: str | None = None,
        match_condition: MatchConditions | None = None,
        **kwargs: Any,
    ) -> Item:
        """Replace; with `match_condition=IfNotModified`, only while the stored `_etag` is `etag`."""
        item_id = _id_of(item)
        lose = self.gate(f"{self.name}.replace_item {item_id}", True)
        self._check_condition(item_id, etag, match_condition)
        return self._answer(self._store(body | {"id": item_id}), lose)

    def delete_item(self, item: str | Item, partition_key: Any, **kwargs: Any) -> None:
        """Delete; CosmosResourceNotFoundError when missing."""
        item_id = _id_of(item)
        lose = self.gate(f"{self.name}.delete_item {item_id}", True)
        if self.peek(item_id) is None:
            raise CosmosResourceNotFoundError(status_code=404, message=f"{item_id} not found")
        del self._items[item_id]
        self._answer({}, lose)

    def patch_item(
        self,
        item: str | Item,
        partition_key: Any,
        patch_operations: list[dict[str, Any]],
        *,
        filter_predicate: str | None = None,
        etag: str | None = None,
        match_condition: MatchConditions | None = None,
        **kwargs: Any,
    ) -> Item:
        """Partial update (set, replace, add, remove, incr on JSON paths), conditional on the etag and on a
        registered `filter_predicate` (412 when it does not hold)."""
        item_id = _id_of(item)
        lose = self.gate(f"{self.name}.patch_item {item_id}", True)
        self._check_condition(item_id, etag, match_condition)
        stored = self.peek(item_id)
        assert stored is not None  # _check_condition raised otherwise
        if filter_predicate is not None:
            predicate = FILTER_PREDICATES.get(filter_predicate)
            if predicate is None:
                self.gaps.append(filter_predicate)
                raise AssertionError(f"unregistered patch filter predicate: {filter_predicate!r}")
            if not predicate(stored):
                raise CosmosAccessConditionFailedError(status_code=412, message="filter predicate not met")
        for operation in patch_operations:
            _apply_patch(stored, operation)
        return self._answer(self._store(stored), lose)

    def query_items(
        self,
        query: str,
        parameters: list[dict[str, Any]] | None = None,
        *,
        max_item_count: int | None = None,
        **kwargs: Any,
    ) -> Paged:
        """A registered query over the live items, paged by `max_item_count` (`by_page`, continuation tokens)."""
        function = registered_query(query)
        if function is None:
            self.gaps.append(query)
            raise AssertionError(f"unregistered query text (the app's query changed?): {query!r}")
        params = {p["name"]: p["value"] for p in parameters or []}
        live = lambda: [i for _, i in sorted(self._items.items()) if not self._expired(i)]  # noqa: E731 - uncopied
        return Paged(self, query, lambda: copy.deepcopy(function(live(), params)), max_item_count or 100)

    # Internals -----------------------------------------------------------------------------------------------------

    def _check_condition(self, item_id: str, etag: str | None, condition: MatchConditions | None) -> None:
        stored = self.peek(item_id)
        if stored is None:
            raise CosmosResourceNotFoundError(status_code=404, message=f"{item_id} not found")
        if condition == MatchConditions.IfNotModified and etag != stored["_etag"]:
            raise CosmosAccessConditionFailedError(status_code=412, message="precondition failed (etag)")

    def _store(self, body: Item) -> Item:
        self._etags += 1
        # JSON round trip: what Cosmos stores is JSON (enum members become their values, tuples lists).
        item = json.loads(json.dumps({k: v for k, v in body.items() if not k.startswith("_")}))
        item |= {"_etag": f'"{self.name}-{self._etags}"', "_ts": int(self._clock())}
        self._items[item["id"]] = item
        return copy.deepcopy(item)

    @staticmethod
    def _answer(item: Item, lose: bool) -> Item:
        if lose:  # the write took effect, the answer never arrived
            from azure.core.exceptions import ServiceResponseError

            raise ServiceResponseError("simulated: connection dropped after the write")
        return item

    def _expired(self, item: Item) -> bool:
        if self.default_ttl is None:
            return False
        ttl = item.get("ttl", self.default_ttl)
        return ttl is not None and ttl > 0 and item["_ts"] + ttl <= self._clock()


class Paged:
    """What query_items returns: iterable over every row, or page by page (`by_page(continuation)`), each page a
    yield point of its own."""

    def __init__(self, container: MemoryContainer, query: str, run: Callable[[], list[Any]], page_size: int) -> None:
        self._container, self._query, self._run, self._page_size = container, query, run, page_size

    def __iter__(self) -> Iterator[Any]:
        self._container.gate(f"{self._container.name}.query {_short(self._query)}", False)
        return iter(self._run())

    def by_page(self, continuation_token: str | None = None) -> Pager:
        """Pages of `page_size` rows; the continuation token is the offset of the next page."""
        return Pager(self, int(continuation_token or 0))


class Pager:
    """The page iterator of `Paged.by_page`, with `continuation_token` after each page (None after the last)."""

    def __init__(self, paged: Paged, offset: int) -> None:
        self._paged, self._offset = paged, offset
        self.continuation_token: str | None = str(offset) if offset else None
        self._done = False

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        if self._done:
            raise StopIteration
        paged = self._paged
        paged._container.gate(f"{paged._container.name}.query-page {_short(paged._query)}", False)
        rows = paged._run()  # evaluated per page, like a server continuing a query over changing data
        page = rows[self._offset : self._offset + paged._page_size]
        self._offset += len(page)
        more = self._offset < len(rows)
        self.continuation_token = str(self._offset) if more else None
        self._done = not more
        if not page and self._offset == 0:
            self._done = True
        return page


def _id_of(item: str | Item) -> str:
    return item if isinstance(item, str) else item["id"]


def _short(query: str) -> str:
    return query[:40]


def _apply_patch(item: Item, operation: dict[str, Any]) -> None:
    op, path = operation["op"], [p for p in operation["path"].split("/") if p]
    holder = item
    for part in path[:-1]:
        holder = holder.setdefault(part, {})
    last = path[-1]
    if op in ("set", "replace", "add"):
        holder[last] = operation["value"]
    elif op == "remove":
        holder.pop(last, None)
    elif op == "incr":
        holder[last] = holder.get(last, 0) + operation["value"]
    else:
        raise AssertionError(f"unsupported patch operation {op!r}")


# Queries -----------------------------------------------------------------------------------------------------------


def _expires_at(item: Item) -> Any:
    return (item.get("oauth") or {}).get("expiresAt")


def _due(item: Item, p: Params) -> bool:
    """The expiring query's WHERE for the documents the simulation writes (ISO strings with Z, text-compared as
    Cosmos does, or epoch numbers)."""
    expires = _expires_at(item)
    if isinstance(expires, str):
        due = (
            expires <= p["@thresholdTextBound"]
            or p["@lowerCaseDayFloor"] <= expires <= p["@lowerCaseTextBound"]
            or expires >= p["@afterDigits"]
        )
    elif isinstance(expires, int | float) and not isinstance(expires, bool):
        due = expires <= p["@thresholdEpochS"] or p["@epochMsFloor"] <= expires <= p["@thresholdEpochMs"]
    else:
        due = False
    return due and ("status" not in item or item["status"] not in p["@skipStatuses"])


def _connection_row(item: Item) -> Item:
    row = {k: item[k] for k in ("id", "tenantId", "integrationId", "status", "_ts") if k in item}
    if _expires_at(item) is not None:
        row["expiresAt"] = _expires_at(item)
    return row


def _expiring(soonest_first: bool) -> QueryFunction:
    def run(items: list[Item], p: Params) -> list[Any]:
        rows = [_connection_row(i) for i in items if _due(i, p)]
        if soonest_first:  # Cosmos orders by type first: numbers before strings
            rows.sort(key=lambda r: (isinstance(r.get("expiresAt"), str), r.get("expiresAt") or 0))
        return rows

    return run


def _project(item: Item, select: str) -> Item:
    """A SELECT list of `c.path.to.field [AS alias]` items over one document (undefined fields are left out, as Cosmos
    leaves them out of a projection)."""
    row: Item = {}
    for part in select.split(","):
        path, _, alias = part.strip().partition(" AS ")
        value: Any = item
        for name in path.strip().removeprefix("c.").split("."):
            value = value.get(name) if isinstance(value, dict) else None
        if value is not None:
            row[alias.strip() or path.strip().rsplit(".", 1)[-1]] = value
    return row


def _current_state(i: Item, p: Params) -> bool:
    return i["id"] == p["@id"] and i.get("tenantId") == p["@tenantId"]


def _history(i: Item, p: Params) -> bool:
    return (
        i["id"] in p["@ids"]
        or i.get("kind") == "held"
        or (
            i.get("kind") == "claim"
            and i.get("state") == p["@refreshed"]
            and i.get("updatedAt", 0) >= p["@since"]
            and i.get("connectionKey") in p["@keys"]
        )
    )


def _outcomes_since(items: list[Item], p: Params) -> list[Any]:
    return [
        sum(
            1
            for i in items
            if i.get("kind") == "claim"
            and i.get("updatedAt", 0) >= p["@since"]
            and i.get("state") in (p["@refreshed"], p["@failed"])
        )
    ]


# Copied from shared/state_store.py (outcomes_since, and the WHERE of connection_history) and shared/connection_store.py
# (current_state's WHERE): a change there must show up here as an unregistered query.
OUTCOMES_SINCE_QUERY = (
    "SELECT VALUE COUNT(1) FROM c WHERE c.kind = 'claim' AND c.updatedAt >= @since "
    "AND (c.state = @refreshed OR c.state = @failed)"
)
HISTORY_WHERE = (
    "ARRAY_CONTAINS(@ids, c.id) OR c.kind = 'held' OR (c.kind = 'claim' AND c.state = @refreshed "
    "AND c.updatedAt >= @since AND ARRAY_CONTAINS(@keys, c.connectionKey))"
)
CURRENT_STATE_WHERE = "c.id = @id AND c.tenantId = @tenantId"

QUERIES: dict[str, QueryFunction] = {
    expiring_connections_query(with_max_age=False): _expiring(soonest_first=False),
    expiring_connections_query(with_max_age=False, soonest_first=True): _expiring(soonest_first=True),
    OUTCOMES_SINCE_QUERY: _outcomes_since,
}
# `SELECT <fields> FROM c WHERE <where>` queries, by the exact text of their WHERE: the field list is projected as
# written (so adding a field to a projection needs no change here), the WHERE is this Python predicate.
WHERES: dict[str, Callable[[Item, Params], bool]] = {
    CURRENT_STATE_WHERE: _current_state,
    HISTORY_WHERE: _history,
}


def registered_query(query: str) -> QueryFunction | None:
    """The function answering `query`: by its exact text, or a projection over a registered WHERE."""
    if query in QUERIES:
        return QUERIES[query]
    select, found, where = query.partition(" FROM c WHERE ")
    if not found or not select.startswith("SELECT ") or select.startswith("SELECT VALUE") or where not in WHERES:
        return None
    predicate, fields = WHERES[where], select.removeprefix("SELECT ")
    return lambda items, p: [_project(i, fields) for i in items if predicate(i, p)]


# Patch filter predicates by exact text (none used yet): each a Python function of the stored item.
FILTER_PREDICATES: dict[str, Callable[[Item], bool]] = {}
