"""Progress on the driver: a tqdm bar on a terminal, one plain line per stage or batch of shards otherwise
(logs of batch jobs and CI are files, where a bar's carriage returns turn into noise)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, *, stream=None, every_seconds: float = 10.0, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.every_seconds = every_seconds
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._rows = 0
        self._shards = 0
        self._started = time.perf_counter()
        self._last_line = self._started

    def stage(self, message: str) -> None:
        if not self.quiet:
            print(f"audit: {message}", file=self.stream, flush=True)

    def start(self, total_shards: int | None, done_shards: int = 0) -> None:
        self._started = self._last_line = time.perf_counter()
        if self.quiet or not self.tty:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total_shards, initial=done_shards, unit="shard", file=self.stream, dynamic_ncols=True)

    def shard_done(self, rows: int) -> None:
        self._rows += rows
        self._shards += 1
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(rows=self._rows, rows_per_s=f"{self.rate():.0f}", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_seconds:
            self._last_line = now
            self.stage(f"{self._shards} shards scored ({self._rows} rows, {self.rate():.0f} rows/s)")

    def rate(self) -> float:
        elapsed = time.perf_counter() - self._started
        return self._rows / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.quiet and self._shards:
            self.stage(f"scored {self._shards} shards ({self._rows} rows, {self.rate():.0f} rows/s)")
