"""Graceful stop: the first SIGINT/SIGTERM asks the run to stop at the next chunk boundary.

The coordinator polls the request between chunks (and abandons a chunk that
does not end within a few seconds); the trainer then saves a checkpoint of the
last commit, the history, the model and a summary with ``status:
interrupted``. A second signal exits at once. Install after `ray.init()`:
Ray's core replaces a SIGTERM handler installed before it.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """Callable: returns the `time.monotonic()` of the first stop signal, or None."""

    def __init__(self, quiet: bool = False):
        self.at: float | None = None
        self.signum: int | None = None
        self.quiet = quiet
        self._previous: dict[int, object] = {}

    def __call__(self) -> float | None:
        return self.at

    def request(self, signum: int) -> None:
        """What the first signal does (also callable directly, e.g. by tests)."""
        self.at = time.monotonic()
        self.signum = signum

    def _handle(self, signum: int, frame) -> None:
        if self.at is not None:
            # A second signal: leave now (finally-blocks still stop the workers).
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(EXIT_STATUS.get(signum, 128 + signum))
        self.request(signum)
        print(f"distbackprop: {signal.Signals(signum).name} received: stopping at the next "
              "chunk boundary and saving (send it again to exit at once)", file=sys.stderr)

    def install(self) -> bool:
        """Handle SIGINT and SIGTERM in this (main) thread; False if not the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in EXIT_STATUS:
            self._previous[sig] = signal.signal(sig, self._handle)
            if signal.getsignal(sig) != self._handle:  # pragma: no cover - defensive
                raise RuntimeError(f"could not install the {signal.Signals(sig).name} handler")
        return True

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def exit_status(self) -> int | None:
        return None if self.signum is None else EXIT_STATUS.get(self.signum, 128 + self.signum)


__all__ = ["EXIT_STATUS", "StopRequest"]
