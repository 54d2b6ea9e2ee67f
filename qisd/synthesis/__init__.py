"""Synthesis: delivered packets in, synthesis packets out (DESIGN "Synthesis").

Files and their roles:

* ``stats`` -- weighted running statistics per outcome field (pure);
* ``encoding`` -- how an aggregate becomes a synthesis packet's outcome map and back
  (pure; the scheme is in its docstring);
* ``noise`` -- optional Laplace noise on what a synthesis publishes (pure);
* ``base`` -- the :class:`Synthesizer` plug-in protocol, :class:`SynthesisDraft`,
  :class:`SynthesizerSettings` and :func:`load_synthesizer` (entry point group
  ``qisd.synthesizers``);
* ``cohort`` -- :class:`CohortSynthesizer`, the default plug-in (leader clustering of
  similar cases into cohorts, one synthesis per cohort);
* ``worker`` -- :func:`run_worker`, the thin trio loop that feeds a synthesizer from
  the delivery channel, catches up from the store and publishes drafts.

``worker`` is imported on first use, so the pure modules never load trio. The daemon
signs drafts into packets; :mod:`qisd.answer` reads syntheses back when it
answers a query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qisd.synthesis.base import (
    ENTRY_POINT_GROUP,
    SynthesisDraft,
    Synthesizer,
    SynthesizerError,
    SynthesizerSettings,
    available_synthesizers,
    bounded_parents,
    load_synthesizer,
    series_id,
)
from qisd.synthesis.cohort import CohortSynthesizer
from qisd.synthesis.encoding import (
    Decoded,
    Encoded,
    EncodingError,
    aggregate_of,
    decode_outcome,
    encode_aggregate,
)
from qisd.synthesis.stats import CategoricalStat, NumericStat, OutcomeAggregate

if TYPE_CHECKING:
    from qisd.synthesis.worker import (
        CarriesPacket,
        WorkerState,
        WorkerStatistics,
        run_worker,
    )

_WORKER_NAMES = frozenset({"CarriesPacket", "WorkerState", "WorkerStatistics", "run_worker"})


def __getattr__(name: str) -> Any:
    # The worker (trio) loads on first use, so the pure modules (and qisd.answer)
    # can be imported without pulling in trio.
    if name in _WORKER_NAMES:
        from qisd.synthesis import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'qisd.synthesis' has no attribute {name!r}")

__all__ = [
    "ENTRY_POINT_GROUP",
    "CarriesPacket",
    "CategoricalStat",
    "CohortSynthesizer",
    "Decoded",
    "Encoded",
    "EncodingError",
    "NumericStat",
    "OutcomeAggregate",
    "SynthesisDraft",
    "Synthesizer",
    "SynthesizerError",
    "SynthesizerSettings",
    "WorkerState",
    "WorkerStatistics",
    "aggregate_of",
    "available_synthesizers",
    "bounded_parents",
    "decode_outcome",
    "encode_aggregate",
    "load_synthesizer",
    "run_worker",
    "series_id",
]
