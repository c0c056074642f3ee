"""Helpers for the reliability tests: a time limit for in-process checks (no plugin needed) and
the bad-input corpus, generated at test time (no binary file is committed)."""
from __future__ import annotations

import signal
from contextlib import contextmanager


@contextmanager
def time_limit(seconds: int):
    """Raises TimeoutError in the main thread after `seconds` (a hung DataLoader, a silent child)."""
    def expire(signum, frame):
        raise TimeoutError(f"gave up after {seconds} s: something hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
