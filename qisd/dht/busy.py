"""An overloaded peer says "busy"; how a caller waits and asks again (trio).

A qisd node whose storage handlers are all taken answers packet RPCs at once with
"busy" (``rejected:busy`` per packet for stores; ``busy: true`` for finds and gets)
instead of dropping them, so a caller can tell an overloaded peer from a dead one
or from a stock node that ignores these RPCs. The caller asks the same peer again
after a short, jittered, doubling pause: moving on to the next-closest node instead
would leave copies where they do not belong and cost more requests than waiting.
"""

from __future__ import annotations

import random

import trio

#: The per-packet status of a store refused because the node is overloaded.
BUSY = "rejected:busy"
#: A busy peer is asked this many times in all, after BUSY_BACKOFF, 2x, 4x... seconds.
BUSY_RETRIES = 3
BUSY_BACKOFF = 0.05


async def busy_backoff(rng: random.Random, attempt: int) -> None:
    """The pause before asking a busy peer again (``attempt`` from 0), jittered."""
    await trio.sleep(BUSY_BACKOFF * 2**attempt * (0.5 + rng.random()))
