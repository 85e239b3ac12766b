"""Hook specifications: the whole contract between the core and its plugins.

A plugin is a module (or object) with functions decorated by :data:`harness.hookimpl` whose names
match the hooks below. It is found through the entry-point group ``harness``::

    [project.entry-points.harness]
    mymethod = "harness_mymethod.plugin"

First-party plugins are registered exactly this way. The core calls each plugin's
implementation separately, so one plugin that raises does not hide the others. A function whose
name starts with ``harness_`` but matches no hook below (a misspelling such as
``harness_method``) is reported as a problem naming the plugin, instead of being ignored.

Importing a plugin's entry-point module must be cheap: heavy libraries (diffusers, timm,
transformers) are imported when a method is built, not when its spec is declared, so that
``harness list`` and ``harness --help`` stay fast.

Hooks, in the order the core calls them:

- *declaration*: :func:`harness_methods`, :func:`harness_datasets`, :func:`harness_metrics`,
  :func:`harness_executors` (once, when the registry loads);
- *reporting*: :func:`harness_run_started`, :func:`harness_job_started`,
  :func:`harness_job_finished`, :func:`harness_run_finished` (as a run progresses, on the
  driver).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from harness.engine.jobs import Job
    from harness.results.records import Record
    from harness.specs import DatasetSpec, ExecutorSpec, MethodSpec, MetricSpec

PROJECT_NAME = "harness"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- declaration --------------------------------------------------------------------------------

@hookspec
def harness_methods() -> Sequence["MethodSpec"]:
    """Return the anomaly detection methods this plugin provides.

    Returns
    -------
    sequence of MethodSpec
        One spec per method. Names must be unique across all installed plugins; a duplicate is
        reported with both plugins' names and the later one is ignored.
    """


@hookspec
def harness_datasets() -> Sequence["DatasetSpec"]:
    """Return the datasets this plugin can load.

    Returns
    -------
    sequence of DatasetSpec
        One spec per dataset. The loader must never download anything.
    """


@hookspec
def harness_metrics() -> Sequence["MetricSpec"]:
    """Return the per-category metrics this plugin computes.

    Returns
    -------
    sequence of MetricSpec
        Each metric is computed on every category of every finished job and stored in the
        record under its name.
    """


@hookspec
def harness_executors() -> Sequence["ExecutorSpec"]:
    """Return the engines this plugin can run planned jobs on (``harness run --executor NAME``).

    Returns
    -------
    sequence of ExecutorSpec
        The core provides ``inprocess`` (the default) and ``ray``.
    """


# -- reporting ----------------------------------------------------------------------------------

@hookspec
def harness_run_started(jobs: Sequence["Job"], options: Mapping[str, Any]) -> None:
    """Called once before the first job of a run.

    Parameters
    ----------
    jobs : sequence of Job
        Every job of the run, including those that will be skipped because they already finished.
    options : mapping
        The run's options (results directory, device, evaluation size, ...).
    """


@hookspec
def harness_job_started(job: "Job") -> None:
    """Called when a job starts (after it was found not to be finished already).

    Parameters
    ----------
    job : Job
        The job's key: method, dataset, protocol, shots, seed, profile.
    """


@hookspec
def harness_job_finished(job: "Job", record: "Record") -> None:
    """Called after a job's record was written, whether the job succeeded or failed.

    Parameters
    ----------
    job : Job
        The job's key.
    record : Record
        The record as written to disk (see :mod:`harness.results.records`): status, metrics per
        category, typed efficiency figures, run information, environment, error if any. In
        harness 0.3 and earlier this was the record's JSON dict; ``record["status"]`` and ``record.get("run")``
        still give the JSON form, with a ``DeprecationWarning`` naming the attribute to read
        instead (``record.status``, ``record.run``), and ``record.to_dict()`` gives all of it.
    """


@hookspec
def harness_run_finished(records: Sequence["Record"], interrupted: bool) -> None:
    """Called once at the end of a run, also after Ctrl-C.

    Parameters
    ----------
    records : sequence of Record
        The records of every job of this run that has one (finished now or earlier).
    interrupted : bool
        True when the run was stopped by the user before all jobs finished.
    """
