"""The DHT benchmarks, ``scripts/bench_dht.py`` and ``scripts/bench_floor.py``, run end to
end at a tiny size (real sockets on 127.0.0.1, a few seconds), so the commands the README
quotes keep working; their figures are checked only where they are exact (counts,
success), never timed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_floor_answers_every_request_in_each_loop() -> None:
    out = run_script("bench_floor", "--nodes", "21", "--ops", "30")
    rows = {line[:14].strip(): line[14:].split() for line in out.splitlines()[2:]}
    assert set(rows) == {"asyncio", "trio sockets", "trio raw"}
    for figures in rows.values():
        puts, datagrams, us_per_pair = figures
        assert float(puts.replace(",", "")) > 0
        assert datagrams == "40.0"  # 20 requests and their 20 answers, none lost
        assert float(us_per_pair) > 0


def test_bench_dht_compares_both_and_ends_with_its_summary_line() -> None:
    out = run_script("bench_dht", "--nodes", "25", "--ops", "30")
    lines = out.splitlines()
    found = next(line for line in lines if line.startswith("packets found of 5"))
    assert found.split()[-3:] == ["5", "1", "5.00"]  # qisd keeps all five, stock one
    for label in ("put success", "get success", "warm put success"):
        row = next(line for line in lines if line.startswith(label))
        assert row.split()[-3:-1] == ["100.0%", "100.0%"], row
    last = re.fullmatch(
        r"put_throughput_ratio=(\S+) get_p99_ratio=(\S+) success=(\S+)", lines[-1]
    )
    assert last is not None, lines[-1]
    assert float(last.group(1)) > 0 and float(last.group(2)) > 0
    assert last.group(3) == "100.0"
