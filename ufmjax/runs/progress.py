"""A dependency-free progress bar on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, desc) as bar: bar.update(n, loss=...)`; silent when disabled."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = max(1, int(total)), desc, enabled
        self.stream = stream or sys.stderr
        self.n, self.t0, self._last = 0, time.perf_counter(), 0.0

    def __enter__(self):
        return self

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.2 and self.n < self.total):
            return
        self._last = now
        frac = min(1.0, self.n / self.total)
        bar = "#" * int(24 * frac)
        rate = self.n / max(now - self.t0, 1e-9)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        self.stream.write(f"\r{self.desc} [{bar:<24}] {self.n}/{self.total} {rate:.1f}/s {extra}   ")
        self.stream.flush()

    def __exit__(self, *exc):
        if self.enabled:
            self.stream.write(f"\r{self.desc} done in {time.perf_counter() - self.t0:.1f}s" + " " * 40 + "\n")
            self.stream.flush()
