"""The bounded pipeline pack, unpack and verify run tensors through: every core busy, memory bounded.

Tensors are worked on by a pool of threads (the work, reading, encoding, compressing and hashing, releases
the GIL) and handed back in their order, so what is written is the same whatever the timing. A tensor in
flight, running or done and waiting its turn, holds its memory; the pool admits the next tensor only while
their costs together stay within a byte budget (a tensor costing more than the budget runs alone). Peak
memory is therefore the budget plus what the process holds anyway, whatever the model's size.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from xorgemm._threads import threads

# What a process holds besides the tensors in flight (Python, torch, the indexes) is well under this; the
# rest of 1 GiB is the slack the budget may use (see memory_budget).
SLACK_BYTES = 384 * 1024 * 1024


def memory_budget(largest_cost: int) -> int:
    """The bytes in flight a command may hold: its largest tensor's cost, plus SLACK_BYTES for the smaller
    tensors around it."""
    return largest_cost + SLACK_BYTES


def bounded_map(fn: Callable, items: Iterable, cost: Callable[[object], int], *, budget: int,
                workers: int | None = None) -> Iterator[tuple[object, object]]:
    """Yields (item, fn(item)) in the items' order, fn running on `workers` threads. Items in flight cost at
    most `budget` together, an item's cost released once the consumer has taken its result and asked for
    the next. fn's exception comes out where its item would have. Closing the iterator early cancels what has
    not started and waits for what has."""
    workers = workers or threads()
    if workers == 1:  # on one thread, in order: no pool to start, nothing in flight but the item at hand
        for item in items:
            yield item, fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xorgemm")
    pending: deque[tuple[object, int, Future]] = deque()
    in_flight = 0
    try:
        for item in items:
            c = cost(item)
            while pending and (in_flight + c > budget or len(pending) >= 2 * workers):
                done_item, done_cost, fut = pending.popleft()
                yield done_item, fut.result()
                in_flight -= done_cost
            pending.append((item, c, pool.submit(fn, item)))
            in_flight += c
        while pending:
            done_item, _, fut = pending.popleft()
            yield done_item, fut.result()
    finally:
        for _, _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
