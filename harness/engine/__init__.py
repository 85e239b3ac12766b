"""The engine: everything between the command line and a job's record.

A run is planned (:mod:`~harness.engine.planning`: jobs, settings, resources, every usage check),
checked against the machine (:mod:`~harness.engine.preflight`), then handed to an executor
(:mod:`harness.engine.executors`), which runs each job through :mod:`~harness.engine.runner`:
build, :mod:`~harness.engine.fitting`, :mod:`harness.engine.inference` (predict, time, score) and
:mod:`~harness.engine.recording`. :mod:`harness.engine.support` holds what those stages lean on
(checkpoints, locks, signals, progress, atomic files, the environment a record names).

Plugins do not import from here: what they need is in :mod:`harness` and :mod:`harness.toolkit`.
"""
