"""Work shared out to a few Python threads, for compiled (numba, ``nogil``) kernels.

The kernels release the GIL, so plain threads run them in parallel without numba's own thread
pool, which could contend with PyTorch's OpenMP threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

__all__ = ["run_chunks"]


def run_chunks(work: Callable[[Iterator[int]], None], n_chunks: int, n_threads: int, name: str = "mapstorch") -> None:
    """Call ``work(next_chunk)`` on ``min(n_threads, n_chunks)`` threads (this one included), each
    taking chunk indices from one shared iterator until none are left; re-raise a worker's error."""
    chunks = iter(range(n_chunks))  # range iterators hand out each index once, under the GIL
    n_workers = max(1, min(int(n_threads), n_chunks))
    if n_workers == 1:
        work(chunks)
        return
    errors: list[BaseException] = []

    def guarded():
        try:
            work(chunks)
        except BaseException as exc:  # noqa: BLE001 -- handed to the calling thread
            errors.append(exc)

    others = [threading.Thread(target=guarded, name=f"{name}-{i}", daemon=True) for i in range(n_workers - 1)]
    for th in others:
        th.start()
    guarded()
    for th in others:
        th.join()
    if errors:
        raise errors[0]
