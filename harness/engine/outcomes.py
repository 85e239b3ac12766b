"""What a run reports: one outcome per job, and the run's summary (the exit status, the lines shown).

Every executor returns these, so they live apart from the runner that produces the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.engine.jobs import Job

if TYPE_CHECKING:
    from harness.results.records import Record

__all__ = ["JobOutcome", "RunSummary"]


@dataclass
class JobOutcome:
    """What happened to one job in this run."""

    job: Job
    status: str  # "ok", "failed" or "skipped"
    record_path: Path
    record: Record | None = None
    message: str = ""


@dataclass
class RunSummary:
    """Outcome of a run.

    Attributes
    ----------
    outcomes : list of JobOutcome
    interrupted : bool
        The run was stopped by Ctrl-C or SIGTERM before all jobs finished.
    exit_code : int
        ``0``, ``1`` (some job failed), ``130`` / ``143`` (interrupted by SIGINT / SIGTERM).
    notes : list of str
        Lines the executor wants shown after the run (retries, lost workers).
    """

    outcomes: list[JobOutcome] = field(default_factory=list)
    interrupted: bool = False
    signal_exit: int = 130
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[JobOutcome]:
        """Jobs that failed in this run."""
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        """The exit status of ``harness run``."""
        if self.interrupted:
            return self.signal_exit
        return 1 if self.failed else 0

    def describe(self) -> str:
        """A short multi-line report of the run for the terminal."""
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("ok", "skipped", "failed")}
        lines = [f"{counts['ok']} job(s) finished, {counts['skipped']} skipped (already finished), {counts['failed']} failed"
                 + (" — interrupted, rerun the same command to resume" if self.interrupted else "")]
        for outcome in self.failed:
            lines.append(f"  FAILED {outcome.job.label}: {outcome.message}")
            lines.append(f"         record: {outcome.record_path}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)
