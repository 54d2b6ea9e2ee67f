"""Key buckets held ready to rank: the packet store's cache for ``top_ids`` (pure).

A responsible node ranks a key's whole bucket by sketch cosine for every query that
probes the key (only the best few cross the network). Reading the bucket is the cost:
a join of every entry to its packet, several times the ranking itself
(``scripts/bench_store.py --daemon``: a repeated query at 200,000 packets took 567 ms
without this cache and 36 ms with it). :class:`Bucket` holds a key's rows as arrays
(ids, expiry times, and the sketches as :class:`qisd.sketch.SketchRows`, one int8
matrix per dimension); :class:`BucketCache` keeps the most recently used buckets
within a byte budget. The store drops a key's bucket on every write that adds or
removes one of its entries and clears the cache on expiry sweeps and rollbacks;
expiry between those is applied at query time from the cached times, so a ranking is
always of what the store holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from qisd.sketch import FloatArray, Sketch, SketchRows

#: Bytes of prepared buckets a store keeps (sketch matrices, norms, ids, times);
#: ``store.cache_bytes`` in the daemon's config.
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
#: Bytes counted per row beside its sketch (id, expiry time, row index), and per
#: bucket.
ROW_OVERHEAD = 96
BUCKET_OVERHEAD = 512

IntArray = npt.NDArray[np.int64]


class Bucket:
    """The live-or-not rows of one key, ready for :meth:`cosine`."""

    __slots__ = ("_sketches", "expires", "ids", "nbytes")

    def __init__(self, rows: Sequence[tuple[bytes, int, int, int, bytes]]) -> None:
        """``rows``: ``(id, expires_ms, dim, bits, sketch data)`` as the store reads them."""
        self.ids = [r[0] for r in rows]
        self.expires: IntArray = np.fromiter((r[1] for r in rows), dtype=np.int64,
                                             count=len(rows))
        self._sketches = SketchRows([(r[2], r[3], r[4]) for r in rows])
        self.nbytes = BUCKET_OVERHEAD + ROW_OVERHEAD * len(rows) + self._sketches.nbytes

    def cosine(self, query: Sketch) -> FloatArray:
        """Cosine of ``query`` against every row (0 for rows of another dimension)."""
        return self._sketches.cosine(query)


class BucketCache:
    """Buckets by key, least recently used out first, within ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, Bucket] = OrderedDict()
        #: Bumped by every drop and clear: a bucket read before a write is not kept.
        self.version = 0

    def get(self, key: bytes) -> Bucket | None:
        bucket = self._items.get(key)
        if bucket is not None:
            self._items.move_to_end(key)
        return bucket

    def put(self, key: bytes, bucket: Bucket) -> None:
        """Keep ``bucket`` (unless it is empty or alone exceeds the budget), evicting
        the oldest."""
        self.drop(key)
        if not bucket.ids or bucket.nbytes > self.max_bytes:
            return
        self._items[key] = bucket
        self.bytes += bucket.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes

    def drop(self, key: bytes) -> None:
        self.version += 1
        bucket = self._items.pop(key, None)
        if bucket is not None:
            self.bytes -= bucket.nbytes

    def clear(self) -> None:
        self.version += 1
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
