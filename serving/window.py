"""A rolling window held in one preallocated NumPy array, for the drift monitor's request path.

A deque window (what ncguard first had) keeps every value or row as its own Python object, so reading
it back means rebuilding an array from up to `size` objects: for the default window of 1000
transfer-feature rows of 256 values that took about 1.3 ms on every request, more than ONNX
Runtime needs to score one input. Here a batch is copied into a ring buffer in place and the
window is read back as a view. Every drift statistic the monitor computes (PSI, KS, class
frequencies, feature means, OOD rate) is a function of the window's multiset of values, not of
their order, so `contents` may return them rotated; `values` gives them oldest first.

Not thread-safe on its own: the monitor writes and reads its windows under its own lock.
"""

from __future__ import annotations

import numpy as np

from ncguard.errors import ConfigError, DataError


class RingWindow:
    """The `size` most recent items (scalars or rows of `item_shape`), stored as `dtype`."""

    def __init__(self, size: int, dtype, item_shape: tuple[int, ...] = ()):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"window size must be a positive integer, got {size!r}")
        self.size = int(size)
        self.item_shape = tuple(item_shape)
        self._buffer = np.zeros((self.size, *self.item_shape), dtype=dtype)
        self._next = 0  # where the next item goes
        self._count = 0

    def extend(self, batch) -> None:
        """Append items [n, *item_shape] (cast to the window's dtype); the oldest fall out."""
        batch = np.asarray(batch)
        if batch.shape[1:] != self.item_shape:
            raise DataError(f"window holds items of shape {self.item_shape}, got a batch of shape {list(batch.shape)}")
        n = len(batch)
        if n >= self.size:  # only the last `size` items survive
            self._buffer[...] = batch[n - self.size :]
            self._next, self._count = 0, self.size
            return
        first = min(n, self.size - self._next)
        self._buffer[self._next : self._next + first] = batch[:first]
        self._buffer[: n - first] = batch[first:]
        self._next = (self._next + n) % self.size
        self._count = min(self._count + n, self.size)

    def contents(self) -> np.ndarray:
        """The window's items in storage order (rotated once it has wrapped); a view, not a copy."""
        return self._buffer[: self._count]

    def values(self) -> np.ndarray:
        """A copy of the items, oldest first."""
        if self._count < self.size:
            return self._buffer[: self._count].copy()
        return np.concatenate([self._buffer[self._next :], self._buffer[: self._next]])

    def __len__(self) -> int:
        return self._count
