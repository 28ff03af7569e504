"""Gene alignments cached per gene list, bounded by bytes, shared and thread-safe.

A million-cell file or a stream of requests with one gene panel aligns once. The keys are the clients' own gene
lists, so the cache is bounded by its estimated size in bytes (not by entries: one 40,000-gene list of 200-character
names is 10 MB), least recently used first out; every adapter over one base shares one cache (their gene order is
the base's), so the bound holds for the whole server, not per adapter. A lock guards every lookup and insertion:
requests align in a thread pool.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from typing import Callable, Hashable

from scimilarity_lora.genes import GeneAlignment

#: default bound: SCIMILARITY_LORA_ALIGNMENT_CACHE_MB (64 MB)
DEFAULT_MAX_BYTES = int(float(os.environ.get("SCIMILARITY_LORA_ALIGNMENT_CACHE_MB", "64")) * 1024 * 1024)


def _key_bytes(key: tuple) -> int:
    total = sys.getsizeof(key)
    for part in key:
        if isinstance(part, tuple):
            total += sys.getsizeof(part) + sum(sys.getsizeof(g) for g in part)
        else:
            total += sys.getsizeof(part)
    return total


def alignment_bytes(key: tuple, alignment: GeneAlignment) -> int:
    """Estimated bytes an entry keeps alive: its key (the gene names), the index arrays and the unknown-gene list
    (whose strings are the key's)."""
    return (_key_bytes(key) + alignment.source_index.nbytes + alignment.target_index.nbytes
            + 8 * len(alignment.unknown_genes) + 64 * len(alignment.rescued) + 512)


class AlignmentCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[GeneAlignment, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, build: Callable[[], GeneAlignment]) -> GeneAlignment:
        """The cached alignment for ``key``, else ``build()`` (outside the lock: aligning 40,000 genes takes
        milliseconds), stored unless it alone exceeds the bound."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0]
        alignment = build()
        size = alignment_bytes(key, alignment)
        if size > self.max_bytes:
            return alignment
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (alignment, size)
                self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return alignment
