"""Shared helpers of the bench scripts: thread setting, timing, markdown tables and results, and
functions replaced by measuring wrappers for one run."""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from mtml.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 1)),
                   help="torch CPU threads (default 1: the machine's 2 cores are shared)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller runs")
    return p


def setup(args) -> str:
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"{device}, torch {torch.__version__}, {args.threads} CPU thread(s)"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds one call of `fn` takes (GPU work included)."""
    return timed2(fn)[0]


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call of `fn`. With one thread, the CPU
    time is what the call costs even while other processes share the cores."""
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu


def median(xs) -> float:
    return statistics.median(xs)


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, title: str, notes: str, rows: list[dict]) -> str:
    """Writes results/<name>.json and returns the markdown section (title, notes, table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", {"title": title, "notes": notes, "rows": rows})
    section = f"## {title}\n\n{notes}\n\n{markdown(rows) if rows else '(no rows)'}\n"
    print(section, flush=True)
    return section


def write_result(text: str, out: Path) -> None:
    """Writes one bench result (markdown) to `out` and prints it with where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text + f"\nwritten to {out}")


@contextmanager
def replaced(patches):
    """Inside: each (owner, name, replacement) of `patches` set; after: the originals back (one the
    owner only inherited, from its class or a base class, is deleted again)."""
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
