"""The in-process tier: a bounded LRU of encoded scores, used from the event loop only."""

from __future__ import annotations

from collections import OrderedDict


class LRU:
    def __init__(self, max_items: int):
        self.max_items = max_items
        self._data: OrderedDict[bytes, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> list[float] | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: bytes, value: list[float]) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_items:
            self._data.popitem(last=False)
