"""The job lifecycle every executor shares: skip, lock or wait, write, report."""

from __future__ import annotations

import dataclasses

from harness.engine.jobs import expand_jobs
from harness.engine.lifecycle import JobLifecycle
from harness.engine.planning import Planner
from harness.engine.runner import Runner
from harness.engine.support.locks import JobLock


def _jobs(*methods):
    return expand_jobs(list(methods), ["toy"], "multiclass", None, [0], {"toy": "tiny"})


def test_a_job_locked_past_the_timeout_fails_without_a_record_and_the_run_goes_on(toy_registry, run_options):
    options = dataclasses.replace(run_options, lock_timeout=0.5)
    plan = Planner(toy_registry, options).plan(_jobs("meanimage", "nanmaps"))
    held = JobLock(plan.jobs[0].job.lock_path(options.results_dir))
    assert held.try_acquire()
    try:
        summary = Runner(toy_registry, options).run(plan)
    finally:
        held.release()
    locked, other = summary.outcomes
    assert locked.status == "failed" and "still locked by another run after 0.5 s" in locked.message
    assert locked.record is None and not plan.jobs[0].record_path.exists()
    assert other.job.method == "nanmaps" and other.record_path.exists()
    assert summary.exit_code == 1


def test_finished_jobs_are_skipped_unless_forced_and_a_damaged_record_is_moved_aside(toy_registry, run_options):
    Runner(toy_registry, run_options).run(_jobs("meanimage"))
    notes = []
    lifecycle = JobLifecycle(toy_registry, run_options, notes.append)
    planned = Planner(toy_registry, run_options).plan(_jobs("meanimage")).jobs[0]
    assert lifecycle.skip(planned).status == "skipped"
    assert JobLifecycle(toy_registry, dataclasses.replace(run_options, force=True), notes.append).skip(planned) is None
    planned.record_path.write_text("{ not json")
    assert lifecycle.skip(planned) is None and not planned.record_path.exists()
    assert notes and "moved it to" in notes[0]


def test_finish_writes_the_record_and_tells_the_reporters(toy_registry, run_options):
    heard = []

    class Listener:
        from harness import hookimpl

        @hookimpl
        def harness_job_finished(self, job, record):
            heard.append((job.method, record.status))

    toy_registry.manager.register(Listener())
    planned = Planner(toy_registry, run_options).plan(_jobs("meanimage")).jobs[0]
    lifecycle = JobLifecycle(toy_registry, run_options, print)
    record = lifecycle.failure_record(planned, run_options, "worker", "RayError", "its worker was lost")
    outcome = lifecycle.finish(planned, record, "worker: its worker was lost")
    assert outcome.status == "failed" and outcome.message == "worker: its worker was lost"
    assert planned.record_path.exists() and heard == [("meanimage", "failed")]
