"""Audits of datasets of any size: OOD and drift of every row, merged aggregates, a report.

`run_audit(model, sources, out, AuditOptions(...))` (and `ncguard audit`) scores every row of the
sources with an exported ncguard model and writes per-row Parquet shards, `summary.json` and
`report.html`. Two engines run the same per-shard scoring (ncguard.audit.scoring): `local`, a
thread pool in this process, and `ray`, a Ray Data actor pool on a local or remote Ray cluster.
Aggregates come from mergeable partial statistics (ncguard.audit.partial), so both engines, and a
resumed audit, arrive at the same numbers. Ray is imported only by the ray engine.
"""

from .partial import Binning, PartialStats
from .run import ENGINES, AuditOptions, AuditResult, run_audit

__all__ = ["AuditOptions", "AuditResult", "Binning", "ENGINES", "PartialStats", "run_audit"]
