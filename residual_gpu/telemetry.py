"""Counters a search records, returned as ``KnnResult.telemetry``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA = "residual_gpu.telemetry"
SCHEMA_VERSION = 1


@dataclass
class Telemetry:
    """What one query call did. Counts are totals over the call."""

    method: str = ""
    backend: str = ""
    queries: int = 0
    k: int = 0
    predecessor: bool = False
    #: candidates kept per query by the fast streaming select (first pass)
    keep: int = 0
    #: fast |rho| evaluations of admissible (query, candidate) pairs, all passes
    distance_evaluations: int = 0
    #: accurate (compensated) re-evaluations of contenders during certification
    accurate_evaluations: int = 0
    #: queries searched again because the fast values could not certify their k-th neighbour
    recertified_queries: int = 0
    #: block requests sent to the backend and the (query, candidate) pairs they covered
    block_requests: int = 0
    seconds: dict = field(default_factory=dict)

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def as_dict(self) -> dict:
        row = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION}
        row.update(asdict(self))
        return row
