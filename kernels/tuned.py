"""Launch plans measured faster than the kernels' heuristics, at the shapes Mimi runs them at.

`tuned_tiles.json` beside this file maps op -> shape key -> batch -> tiles (the keyword arguments of
the op's tiles type). It is written by `bench/sweep_tiles.py --table` from sweeps on an H200 or an H100: for
every op, shape and batch size swept, the fastest of the heuristic's plan and its neighbours (a
neighbour is kept only if it beat the heuristic by more than the timing noise). Shapes not in the
table, and every shape on the CPU interpreter's tiny test sizes, use the heuristics. A batch between
the swept ones takes the plan of the nearest swept batch on a log scale (the larger on a tie). The
plans assume Hopper's 132 SMs (H200 and H100 SXM alike); on other GPUs they stay correct, maybe slower.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("tuned_tiles.json")
_enabled = True
_substitute: dict | None = None


@functools.cache
def _table() -> dict:
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


def shape_key(*dims) -> str:
    """The table's key for a shape: its dimensions (ints or dtype names) joined by commas."""
    return ",".join(str(d).removeprefix("torch.") for d in dims)


def tuned_tiles(op: str, shape: str, batch: int) -> dict | None:
    """The measured plan of `op` at `shape` (a shape_key) for the nearest swept batch, or None."""
    if not _enabled:
        return None
    table = _substitute if _substitute is not None else _table()
    entries = table.get(op, {}).get(shape)
    if not entries:
        return None
    nearest = min(entries, key=lambda swept: (abs(math.log2(int(swept)) - math.log2(max(batch, 1))), -int(swept)))
    return dict(entries[nearest])


def any_tuned_plan(op: str, shape: str, key: str) -> bool:
    """Whether a measured plan of `op` at `shape`, at any swept batch, sets `key` (e.g. a flag whose operands a model
    prepares once, only where some batch's plan reads them)."""
    table = _substitute if _substitute is not None else _table()
    return any(plan.get(key, False) for plan in table.get(op, {}).get(shape, {}).values())


@contextlib.contextmanager
def heuristics_only():
    """Ignores the table inside the block (to time or list the heuristics' own plans)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


@contextlib.contextmanager
def plans_from(table: dict):
    """Takes the plans of `table` (the layout of tuned_tiles.json) instead of the file's inside the block; what is
    planned there keeps them (a CUDA graph captured there, a cache's split workspace sized there). Benchmarks time
    another table's plans, e.g. the one before a sweep, beside the current ones in the same process."""
    global _substitute
    saved, _substitute = _substitute, table
    try:
        yield
    finally:
        _substitute = saved
