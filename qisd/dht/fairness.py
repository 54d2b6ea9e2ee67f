"""A fair share of the handler slots for each source (pure apart from the wrapped work).

Rate limits (:mod:`qisd.dht.ratelimit`) bound how many requests a source may send,
but a request that must wait for storage (:class:`~qisd.dht.deferred.Deferred`:
``store_packets``, ``find_packets``) holds one of the transport's ``max_handlers``
slots, and the worker threads serve them first come, first served. A peer sending
within its rate could still keep every slot and the thread queue busy, so everyone
else's packet requests would wait behind it (measured: a flood at 10x a per-source
limit of 200/s pushed other peers' ``find_packets`` past a 1 s timeout). So a
source holds at most ``per_source`` running handlers; beyond that its request gets
the handler's ``busy`` answer at once (qisd callers back off and ask again).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Any

from qisd.dht.deferred import Deferred


class FairShare:
    def __init__(self, per_source: int) -> None:
        if per_source < 1:
            raise ValueError("fair share: per_source must be >= 1")
        self.per_source = per_source
        self._active: Counter[Hashable] = Counter()
        #: Requests answered ``busy`` because their source held its whole share.
        self.refused = 0

    def wrap(self, source: Hashable, job: Deferred) -> Deferred:
        """``job`` counted against ``source``'s share while it runs."""

        async def work() -> Any:
            # Checked when the handler starts (not at dispatch): a job the transport
            # never runs (no free slot) must not hold a share.
            if self._active[source] >= self.per_source:
                self.refused += 1
                return job.busy
            self._active[source] += 1
            try:
                return await job.work()
            finally:
                self._active[source] -= 1
                if self._active[source] <= 0:
                    del self._active[source]

        return Deferred(work, busy=job.busy)

    def active(self, source: Hashable) -> int:
        return self._active[source]
