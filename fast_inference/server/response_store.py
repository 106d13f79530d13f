"""The bounded in-memory store of /v1/responses objects: bounded in count and in bytes, the least recently
used out first."""

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class StoredResponse:
    """One stored response: the object GET answers with and the conversation through it."""

    body: dict  # the Response object
    history: list[dict]  # chat messages: the conversation's input and this response's output
    cancel: Callable[[], None] | None = None  # stops the generation while it is in progress
    nbytes: int = 0


def _size(entry: StoredResponse) -> int:
    """The entry's size as JSON text: what the bound counts (the Python objects take a small multiple)."""
    return len(json.dumps(entry.body, ensure_ascii=False)) + len(
        json.dumps(entry.history, ensure_ascii=False)
    )


class ResponseStore:
    """id -> StoredResponse. A put that does not fit evicts the least recently used entries; an entry
    bigger than the whole byte budget is not kept (put says so)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(
                f"the response store needs room: max_entries={max_entries}, max_bytes={max_bytes}"
            )
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._entries

    def put(self, response_id: str, entry: StoredResponse) -> bool:
        """Store (or replace) entry as the most recently used; False when it alone exceeds max_bytes."""
        self.delete(response_id)
        entry.nbytes = _size(entry)
        if entry.nbytes > self.max_bytes:
            return False
        while self._entries and (
            len(self._entries) >= self.max_entries or self.nbytes + entry.nbytes > self.max_bytes
        ):
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._entries[response_id] = entry
        self.nbytes += entry.nbytes
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self.nbytes -= entry.nbytes
        return True
