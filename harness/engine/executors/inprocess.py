"""The default executor: every job of the plan, in order, in this process."""

from __future__ import annotations

from typing import Any

from harness.engine.outcomes import RunSummary
from harness.engine.support.signals import RunInterrupted


class InProcessExecutor:
    """Runs jobs one after another; Ctrl-C / SIGTERM stop it between (or inside) jobs."""

    def run(self, plan: Any, runner: Any) -> RunSummary:
        """Run ``plan``'s jobs with ``runner`` (a :class:`harness.engine.runner.JobRunner`)."""
        summary = RunSummary()
        try:
            with runner.progress.bar(total=len(plan.jobs), desc="jobs", unit="job", leave=True) as bar:
                for planned in plan.jobs:
                    job = planned.job
                    bar.set_postfix_str(f"{job.method} {job.dataset} {job.protocol_label} s{job.seed}")
                    summary.outcomes.append(runner.run_job(planned))
                    bar.update(1)
        except RunInterrupted as stop:
            summary.interrupted, summary.signal_exit = True, stop.exit_code
        except KeyboardInterrupt:
            summary.interrupted, summary.signal_exit = True, 130
        return summary
