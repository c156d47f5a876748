"""Items of an iterator made ahead on a producer thread, handed over in order.

The torch fallback's batches are finished (decoded and resized on the GPU when the device is
CUDA, padded, copied) on this thread, so the training thread only waits for a batch that is
already there. Exceptions reach the consumer at the item where they happened; closing the
consumer's generator (or dropping it) stops the producer and waits for it, so the same source
can be iterated again right after, as a resumed or a new epoch does.
"""

from __future__ import annotations

import queue
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_END = object()
_POLL_S = 0.05  # how often a blocked producer checks whether the consumer has gone


def prefetched(
    make_items: Callable[[], Iterator[T]],
    depth: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[T]:
    """Iterate `make_items()` on a producer thread, at most `depth` items ahead of the consumer.

    `context()` is entered on the producer thread around the whole iteration (for the CUDA
    device and side stream its work must be queued on).
    """
    items: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with context():
                source = make_items()
                try:
                    for item in source:
                        if not put((item, None)):
                            return
                finally:
                    close = getattr(source, "close", None)
                    if close is not None:
                        close()
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))
            return
        put((_END, None))

    producer = threading.Thread(target=produce, name="batch-producer", daemon=True)
    producer.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        producer.join()
