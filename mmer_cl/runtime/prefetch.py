"""Overlap producing the next item with consuming this one: a one-thread read-ahead for tensor streams.

Decoding blobs, hashing and tensor math release the GIL, so on two cores a
stream of tensors runs about as fast as its slower half.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` ahead.

    "Ahead" counts the item being produced: with ``depth=1`` at most two
    items exist at once, the one the caller holds and the next one, so
    memory stays at two tensors' worth. An exception in the producer is
    raised here, at the item where it happened; closing the consumer early
    stops the producer.
    """
    slots: queue.Queue = queue.Queue()
    permits = threading.Semaphore(depth)  # one per item produced but not yet taken
    stop = threading.Event()

    def produce() -> None:
        try:
            iterator = iter(items)
            while True:
                while not permits.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                slots.put((item, None))
                del item
            slots.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer
            slots.put((_DONE, exc))

    worker = threading.Thread(target=produce, name="mmer-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            permits.release()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:  # no waiting here: an interrupt landing in a generator's cleanup would be lost
        stop.set()
        permits.release()  # a producer waiting for a permit wakes, sees ``stop`` and ends
