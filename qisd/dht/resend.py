"""Requests sent again while unanswered: one lost datagram should not cost a timeout.

Over UDP a lost request, or a lost answer, is silence until the RPC timeout ends the
call. With ``retries`` r the transport sends an unanswered request again, with the
same message id, up to r times, so whichever answer arrives first completes the
call; the call still fails after the same ``timeout`` as before (failure detection
is no slower). Under 5% loss per datagram about one request/answer pair in ten is
lost, and each such call then waits one resend delay instead of a whole timeout.

**When to resend.** Silence only means loss once it has lasted clearly longer than
that peer's answers usually take. Each (peer address, method) has a smoothed
round-trip time and its variation (:class:`RoundTrips`, the estimator of RFC 6298:
per method, as a ``ping`` is answered at once and a ``store_packets`` after a store
write). An answer to a resent call counts from its first copy (an overestimate),
and a call that times out counts as a round trip of its whole wait, so a peer that
became slow or went away is not sent copies on the strength of its old speed. A
request is sent again after ``srtt + 4 * rttvar`` (at least :data:`MIN_RESEND`)
from its last copy, r times at most, and never after :data:`LATEST` of its timeout
(checked when the copy would go out: a loop that stalled past it sends nothing): an
answer that late was not lost, it was slow. With nothing known yet the copies are
evenly spaced (``timeout / (r + 1)``).

Resending at a fixed fraction of the timeout instead was tried first and measured
(``scripts/fault_network.py``; docs/reliability.md, "Resent requests"): where
answers were slow because the event loop was saturated (30 nodes in one process),
most copies went to peers that had lost nothing and their load made every query
slower. With the estimate, a saturated node's round trips grow and its resends stop.

Every handler is safe to run twice (stores answer ``duplicate``, finds are reads,
a listen is renewed), and the transport drops a copy of a request whose first copy
is still being served (:class:`qisd.dht.transport.Transport`), so an overloaded
peer is not handed the same storage work again.

No task or timer is added per request: the task that waits for the answers also
sends the copies, waking for a resend only if no answer woke it first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qisd.dht.wire import Address

if TYPE_CHECKING:
    from qisd.dht.transport import Outgoing

#: No resend sooner than this after the previous copy (seconds).
MIN_RESEND = 0.05
#: No resend later than this part of the timeout (the answer is late, not lost).
LATEST = 0.75
#: (peer address, method) pairs whose round trips are remembered, the least recently
#: updated forgotten first (a few hundred contacts times the ~8 methods asked of them;
#: one forgotten is only asked with evenly spaced copies until it answers again).
MAX_ROUTES = 16384

Route = tuple[Address, str]


class RoundTrips:
    """Smoothed round-trip time and variation per peer address and method (RFC 6298,
    2): a ``ping`` is answered at once, a ``store_packets`` after a store write, so
    one estimate for both would resend the slow kind while it is being served."""

    def __init__(self, max_routes: int = MAX_ROUTES) -> None:
        self.max_routes = max_routes
        self._est: dict[Route, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._est)

    def observe(self, route: Route, sample: float) -> None:
        """A request on ``route`` was answered ``sample`` seconds after its first
        copy (or went unanswered for that long)."""
        est = self._est.pop(route, None)
        if est is None:
            if len(self._est) >= self.max_routes:
                del self._est[next(iter(self._est))]
            self._est[route] = (sample, sample / 2)
            return
        srtt, rttvar = est
        rttvar = 0.75 * rttvar + 0.25 * abs(srtt - sample)
        self._est[route] = (0.875 * srtt + 0.125 * sample, rttvar)

    def resend_after(self, route: Route) -> float | None:
        """Seconds of silence after which a request on ``route`` counts as lost; None
        when nothing is known of it yet."""
        est = self._est.get(route)
        if est is None:
            return None
        srtt, rttvar = est
        return max(MIN_RESEND, srtt + 4 * rttvar)


class Resender:
    """When to send an unanswered request again: at most ``retries`` times, never
    after :data:`LATEST` of the call's timeout. It keeps no timer: whoever waits for
    the answer (:meth:`qisd.dht.transport.Transport.call`,
    :class:`qisd.dht.calls.CallGroup`) wakes at the time it gives only if no answer
    woke it first, so a call answered in time costs one estimate update."""

    def __init__(self, *, retries: int) -> None:
        self.times = max(0, retries)
        self.round_trips = RoundTrips()

    def gap(self, call: Outgoing, timeout: float) -> float:
        """Seconds between copies of ``call``'s request."""
        rto = self.round_trips.resend_after((call.addr, call.name))
        return timeout / (self.times + 1) if rto is None else rto

    def next_at(self, call: Outgoing, sent_at: float, timeout: float) -> float | None:
        """When to send ``call`` again, its last copy having gone out at ``sent_at``
        (its first: ``call.started``); None: never."""
        if call.resent >= self.times:
            return None
        when = sent_at + self.gap(call, timeout)
        return when if self.in_time(call, when, timeout) else None

    def in_time(self, call: Outgoing, when: float, timeout: float) -> bool:
        """May a copy of ``call`` go out at ``when``? (An answer later would be slow,
        not lost.)"""
        return when - call.started <= LATEST * timeout

    def observe(self, call: Outgoing, seconds: float) -> None:
        """``call`` ended ``seconds`` after its first copy: answered, or timed out.

        The answer to a resent call may be to either copy, so its time from the first
        copy is an upper bound of the round trip: kept (unlike Karn's rule, which
        would never learn of a peer too slow to answer before a resend), as an
        overestimate only delays resends. A timeout counts as a round trip of the
        whole wait (RFC 6298, 5.5 backs off too), so a peer that became slow, or
        went away, is not sent copies on the strength of its old speed."""
        self.round_trips.observe((call.addr, call.name), seconds)
