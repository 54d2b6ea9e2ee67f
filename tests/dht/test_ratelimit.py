from __future__ import annotations

import pytest

from qisd.dht.ratelimit import RateLimiter, RateLimits, TokenBucket, source_key


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0)
    assert not bucket.take(0.0)
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)
    assert bucket.take(10.0) and bucket.take(10.0) and not bucket.take(10.0)  # capped at burst


def test_per_source_and_total() -> None:
    limits = RateLimits(per_source_rate=1, per_source_burst=2, total_rate=1, total_burst=3)
    limiter = RateLimiter(limits, now=0.0)
    assert limiter.check("a", 0.0) is None
    assert limiter.check("a", 0.0) is None
    assert limiter.check("a", 0.0) == "rate_source"
    assert limiter.check("b", 0.0) is None
    assert limiter.check("c", 0.0) == "rate_total"


def test_source_table_is_bounded() -> None:
    limits = RateLimits(per_source_rate=1, per_source_burst=1, total_rate=0, max_sources=10)
    limiter = RateLimiter(limits, now=0.0)
    for i in range(1000):
        assert limiter.check(i, 0.0) is None
    assert len(limiter) == 10


def test_zero_disables() -> None:
    limiter = RateLimiter(RateLimits(per_source_rate=0, total_rate=0), now=0.0)
    assert all(limiter.check("a", 0.0) is None for _ in range(10_000))


def test_bad_limits() -> None:
    with pytest.raises(ValueError, match="total_rate"):
        RateLimits(total_rate=-1)


def test_source_keys() -> None:
    # IPv4: the address; loopback: address and port (local swarms share one IP).
    assert source_key(("93.184.216.7", 4000)) == source_key(("93.184.216.7", 4001))
    assert source_key(("93.184.216.7", 4000)) != source_key(("93.184.216.8", 4000))
    assert source_key(("127.0.0.1", 4000)) != source_key(("127.0.0.1", 4001))
    # IPv6: the /64, which one host usually holds whole.
    assert source_key(("2a00:1450:1:2::1", 1)) == source_key(("2a00:1450:1:2:ffff:1:2:3", 2))
    assert source_key(("2a00:1450:1:2::1", 1)) != source_key(("2a00:1450:1:3::1", 1))
    assert source_key(("::1", 4000)) != source_key(("::1", 4001))
    # An IPv4 peer on a dual-stack socket counts as that IPv4 address.
    assert source_key(("::ffff:93.184.216.7", 1)) == source_key(("93.184.216.7", 2))
    assert source_key(("::ffff:127.0.0.1", 1)) != source_key(("::ffff:127.0.0.1", 2))
