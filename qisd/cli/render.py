"""Plain-text renderings of control replies for people: aligned tables and
``key  value`` lists, no colour, no extra dependencies.

Each function takes a reply map exactly as the daemon sent it (the same map
``--json`` prints) and tolerates missing or extra keys: the daemon may extend its
replies, and an older CLI should still print what it knows.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "cell",
    "key_values",
    "render_emit",
    "render_event",
    "render_packets",
    "render_peers",
    "render_query",
    "render_status",
    "short",
    "table",
]

_STATUS_FIRST = ("node_id", "listen", "peers", "packets", "metrics", "version")


def short(hex_id: Any, keep: int = 12) -> str:
    """A long hex id cut for a table column (the full one is in ``--json``)."""
    text = cell(hex_id)
    return text if len(text) <= keep + 3 else text[:keep] + "..."


def cell(value: Any) -> str:
    """One value as table text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) >= 1e6 or (value and abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, Mapping):
        return ", ".join(f"{printable(str(k))}={cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value)
    return printable(str(value))


def printable(text: str) -> str:
    """``text`` with every non-printable character (line breaks, carriage returns,
    terminal escapes, NUL) shown as its escape: values in packets come from any
    member of the swarm, and must not forge lines or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell; numbers (and columns ``right``)
    right-aligned."""
    raw = [list(r) for r in rows]
    text = [[cell(v) for v in r] for r in raw]
    widths = [len(h) for h in headers]
    for r in text:
        for i, v in enumerate(r):
            widths[i] = max(widths[i], len(v))
    numeric = [
        i in right or (bool(raw) and all(_is_number(r[i]) or r[i] is None for r in raw))
        for i in range(len(headers))
    ]

    def line(values: Sequence[str], align: Sequence[bool]) -> str:
        parts = [v.rjust(w) if right else v.ljust(w)
                 for v, w, right in zip(values, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line([h.upper() for h in headers], numeric)]
    out += [line(r, numeric) for r in text]
    return "\n".join(out)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, name + ".")
        else:
            items.append((name, value))
    return items


def key_values(mapping: Mapping[str, Any]) -> str:
    """``key  value`` lines (nested maps as dotted keys), keys aligned."""
    items = _flatten(mapping)
    if not items:
        return "(empty)"
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}".rstrip() for k, v in items)


def render_status(result: Mapping[str, Any]) -> str:
    ordered = {k: result[k] for k in _STATUS_FIRST if k in result}
    ordered.update((k, v) for k, v in result.items() if k not in ordered)
    return key_values(ordered)


def render_peers(result: Mapping[str, Any]) -> str:
    peers = result.get("peers") or []
    if not peers:
        return "no peers (this node is alone; join a swarm with: qisd bootstrap HOST:PORT)"
    rows = [
        (p.get("node_id"), p.get("address"), _ago(p.get("last_seen_s")), p.get("failures", "-"))
        for p in peers
    ]
    return table(("node_id", "address", "last_seen", "failures"), rows)


def _ago(seconds: Any) -> str:
    """``12s ago``, ``3m ago``, ``2h ago``; ``-`` when never heard from (or unknown)."""
    if not _is_number(seconds):
        return "-"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _created(ms: Any) -> str:
    if not _is_number(ms):
        return "-"
    when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def render_packets(result: Mapping[str, Any]) -> str:
    packets = result.get("packets") or []
    if not packets:
        return "no packets"
    rows = [
        (p.get("id"), p.get("topic"), p.get("kind"), p.get("n"), short(p.get("origin")),
         _created(p.get("created_ms")), p.get("outcome"))
        for p in packets
    ]
    return table(("id", "topic", "kind", "n", "origin", "created", "outcome"), rows)


def _answer(answer: Mapping[str, Any]) -> str:
    """Scalars as ``key  value``; a map of maps (e.g. per-outcome estimates) as a
    table with one row per entry."""
    scalars = {k: v for k, v in answer.items() if not _is_table(v)}
    parts = [key_values(scalars)] if scalars else []
    for key, value in answer.items():
        if _is_table(value):
            columns: list[str] = []
            for inner in value.values():
                columns += [c for c in inner if c not in columns]
            rows = [[name] + [inner.get(c) for c in columns] for name, inner in value.items()]
            parts.append(table([key, *columns], rows))
    return "\n\n".join(parts) if parts else "(no answer)"


def _is_table(value: Any) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(v, Mapping) for v in value.values()))


def render_query(result: Mapping[str, Any]) -> str:
    matches = result.get("matches") or []
    if matches:
        rows = [
            (_similarity(m.get("similarity")), m.get("id"), m.get("kind"), m.get("n"),
             short(m.get("origin")), m.get("outcome"))
            for m in matches
        ]
        top = table(("similarity", "id", "kind", "n", "origin", "outcome"), rows, right=(0,))
    else:
        top = "no matches"
    answer = result.get("answer")
    if isinstance(answer, Mapping) and answer:
        top = f"{top}\n\nanswer\n{_answer(answer)}"
    notes = result.get("notes")
    if isinstance(notes, list) and notes:  # e.g. packets of another dimension left out
        top += "\n\n" + "\n".join(f"note: {cell(note)}" for note in notes)
    return top


def _similarity(value: Any) -> str:
    # Fixed decimals so a column of similarities reads at a glance.
    return f"{value:.4f}" if _is_number(value) else cell(value)


def render_emit(result: Mapping[str, Any]) -> str:
    return key_values(result)


def render_event(event: Mapping[str, Any]) -> str:
    """One line per watched packet."""
    parts = [_created(event.get("created_ms")), cell(event.get("topic")),
             cell(event.get("kind")), f"n={cell(event.get('n'))}", cell(event.get("id"))]
    if "similarity" in event:
        parts.append(f"similarity={_similarity(event['similarity'])}")
    if event.get("missed"):  # packets this watcher was too slow to take, before this one
        parts.append(f"missed={cell(event['missed'])}")
    parts.append(cell(event.get("outcome")))
    return "  ".join(parts)
