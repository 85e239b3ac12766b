"""Jobs as Ray tasks: on a local Ray instance (one machine, several GPUs) or on a cluster.

The package's parts: :mod:`.executor` (joining or starting Ray), :mod:`.driver` (submitting each
job, collecting its record, retrying a lost worker, stopping), :mod:`.worker` (the task body: one
job planned and run on a node), :mod:`.resources` (what each task asks Ray for; pure functions).
What happens around each job (skip, lock or wait, write, report) is the lifecycle every executor
shares (:mod:`harness.engine.lifecycle`).

``harness run ... --executor ray`` starts a local Ray instance; ``--address auto|HOST:PORT|ray://...``
(or ``$RAY_ADDRESS``) joins a running cluster instead. A script that called ``ray.init`` itself
keeps its connection: the executor uses it and leaves it open.

How a run goes
--------------
The driver (the process that runs ``harness run``) plans every job as for any executor, then for
each job in plan order:

1. skips it when its ``ok`` record exists (a damaged record is moved aside and the job redone);
2. takes the job's lock in ``<results>/locks`` (:mod:`harness.engine.support.locks`), so that two drivers, or a
   driver and an in-process run sharing the results folder, never run one job twice; a job locked
   by another run waits for that run, and is skipped if it finished the job;
3. submits it as one Ray task asking for the job's resources (:func:`task_options`);
4. shows one progress bar with the jobs queued, running, finished, failed and retried;
5. writes the record, atomically, when the task returns it.

Who writes the records: the driver
----------------------------------
A worker runs its job with a :class:`harness.engine.runner.JobRunner` whose results folder is a scratch
folder of its own, and returns the record; the driver adds where the job ran (``run.ray``, below)
and writes it into the one results folder, with the files the job left beside its record (the
saved maps of ``--save-maps``, sent back with the record and swapped into place before the record
is written). So the results folder needs to exist only where the driver runs: nodes need no
shared results storage, a dying node can never leave a half-written or stray record, and every
record of a run has one writer. (``--save-maps all`` sends every test map back this way: hundreds
of MB per job on a real dataset.) What the workers share is the cache
folder (``--cache-dir``): finished fits and mid-fit checkpoints live there, so a retried job
resumes where its lost worker stopped when the cache is on storage every node sees (on one machine
it always is); with a node-local cache a retry on another node fits from the start (same record,
more time).

The job on the worker
---------------------
The task receives the :class:`harness.engine.jobs.Job` and the run's :class:`harness.engine.options.RunOptions`
(a planned job holds callables that need not pickle) and plans that one job again on the worker
with the plugins installed there, found through the ``harness`` entry points, as ``harness run``
finds them: install the harness and the plugins on every node (a local instance's workers share
the driver's environment). The worker loads only the entry points that provide the job's method,
its dataset and the metrics computed on it (:func:`plugins_for`; the built-in ones always), so it
starts sooner and its record has the metrics the driver's registry has. A plugin registered in the
driver's process only (``load_registry(extra_plugins=...)``) cannot reach a worker: a usage error.
A job that cannot be planned on its worker (a plugin missing on that node, a dataset folder it
cannot see) is recorded as failed in phase ``plan``, naming the host. Paths in the options are made absolute on
the driver, so the dataset, weights and cache folders must have the same path on every node.
Plugins' reporter hooks run on the driver (job started, job finished with its record), never on
the workers. A job uses as many torch threads as the CPUs it asked for (at least one).

Resources and devices
---------------------
Each job asks Ray for the resources its method's profile declares (:class:`harness.specs.Resources`),
or ``--job-gpus`` / ``--job-cpus``; fractions are allowed (Ray takes GPU fractions below 1 and
whole numbers above). ``--device cpu`` asks for no GPU. A job that asked for GPUs runs on the
first GPU Ray assigned it (``CUDA_VISIBLE_DEVICES`` lists only the assigned ones, so ``cuda:N``
on the command line does not pick one); a job that asked for none runs on the CPU under ``auto``,
and ``--device cuda`` without a GPU request is a usage error. GPU tasks get a fresh worker process
each (CUDA never stays initialised for another job's assignment). On a local instance a request no
node can meet is a usage error (exit 2) before anything runs; a memory request larger than the
machine's memory is dropped with a warning. On a joined cluster such a job waits for a node that
fits (an autoscaler may add one), with a warning.

Retries and failures
--------------------
A job whose worker dies (killed, out of memory, its node lost, preempted: a SIGTERM makes the
worker save its checkpoint and exit) is submitted again, up to ``--retries`` times; it resumes from
its latest mid-fit checkpoint when the cache is shared. The driver resubmits (Ray's own
``max_retries`` is 0 for these tasks) so that it can say why each attempt ended and count the
attempts in the record. With ``--force`` every attempt starts afresh (``--force`` ignores
checkpoints). After the last retry the job is recorded as failed in phase ``worker``. A job that
fails by itself (an error in fit or predict, NaN maps) is recorded as failed by the worker's
JobRunner, as in process, and is not retried; the other jobs go on.

Ctrl-C and SIGTERM
------------------
The first signal stops submitting and cancels every task: queued ones are dropped, running ones
get an interrupt and, inside a checkpointed training loop, save their checkpoint at the next step
(:mod:`harness.engine.support.signals`). The driver waits up to ``stop_grace`` seconds for them (a second signal
stops at once), writes the record of every job that finished meanwhile, and the summary exits 130
(SIGINT) or 143 (SIGTERM). Rerunning the same command skips the finished jobs and resumes the
others from their checkpoints.

``run.ray`` in the record
-------------------------
``attempts`` (1 when no worker was lost), ``retried_after`` (why each lost attempt ended),
``resources`` (what the task asked Ray for), ``host``, ``node_ip``, ``node_id``, ``pid``,
``gpu_ids`` (Ray's assignment) and ``device`` of the worker that ran the last attempt.
"""

from __future__ import annotations

from harness.engine.executors.ray.executor import RayExecutor, _unreachable
from harness.engine.executors.ray.resources import (NAME, check_requests, plugins_for, shipped_options, task_options,
                                                    torch_threads, worker_device)
from harness.engine.executors.ray.worker import collect_artifacts, place_artifacts, run_on_worker

__all__ = ["NAME", "RayExecutor", "task_options", "torch_threads", "check_requests", "worker_device",
           "shipped_options", "plugins_for", "run_on_worker", "collect_artifacts", "place_artifacts", "_unreachable"]
