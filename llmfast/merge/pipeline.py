"""Merging tensors in parallel while keeping the output order and the memory of a few tensors.

A merge is a chain per tensor: read it from every input (mapping the files, which releases the GIL),
merge it (numpy, which releases the GIL too), write it (in the file's order). One reader thread reads
ahead while `workers` threads merge and the caller writes, so the cores are used across tensors: on
mid-size tensors intra-op threads hand off more than they gain. What is in flight is
bounded by a count and by elements, so a model's largest tensors (embeddings) are merged one at a time
and peak memory stays that of a few tensors.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from typing import Callable, Iterator, TypeVar

R = TypeVar("R")
M = TypeVar("M")

# At most this many elements of output tensors in flight (besides a single larger one): 64M float32 = 256 MB.
MAX_ELEMENTS_IN_FLIGHT = 64 * 2**20


def in_flight_limit(workers: int) -> int:
    """How many tensors may be read or merged ahead of the one being written."""
    return workers + 1


def ordered_map(items: list[tuple[str, int]], read: Callable[[str], R], merge: Callable[[str, R], M],
                workers: int) -> Iterator[tuple[str, M]]:
    """(name, merge(name, read(name))) for each (name, numel) in order, computed ahead by threads.

    An exception in any step is raised from the iterator at that tensor; the rest is cancelled.
    """
    limit = in_flight_limit(workers)
    pending: collections.deque[tuple[str, int, cf.Future]] = collections.deque()
    with cf.ThreadPoolExecutor(1, thread_name_prefix="merge-read") as reader, \
            cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="merge") as pool:
        try:
            todo = iter(items)
            nxt = next(todo, None)
            elements = 0
            while nxt is not None or pending:
                while nxt is not None and (not pending or (len(pending) < limit and
                                                           elements + nxt[1] <= MAX_ELEMENTS_IN_FLIGHT)):
                    name, numel = nxt
                    got = reader.submit(read, name)
                    pending.append((name, numel, pool.submit(_after, got, merge, name)))
                    elements += numel
                    nxt = next(todo, None)
                name, numel, fut = pending.popleft()
                result = fut.result()
                elements -= numel
                yield name, result
                del result
        finally:
            for _name, _n, fut in pending:
                fut.cancel()


def _after(read_future: cf.Future, merge: Callable[[str, R], M], name: str) -> M:
    value = read_future.result()
    return merge(name, value)
