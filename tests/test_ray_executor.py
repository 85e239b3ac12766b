"""The Ray executor on a local Ray cluster started by these tests (one per module).

The toy plugins reach the workers through an entry point (:mod:`ray_toys`), as a real plugin does.
Without Ray installed the cluster tests are skipped, except under CI (``CI`` set), where a missing
Ray is an error: CI installs ``harness-ad[ray]``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.engine.jobs import Job
from harness.engine.options import RunOptions
from harness.engine.planning import Planner
from harness.results.records import load_record
from harness.engine.registry import load_registry
from harness.engine.runner import run_plan
from harness.specs import Resources
from ray_toys import install_entry_point

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

pytestmark = pytest.mark.slow


def _need_ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            raise AssertionError("CI must install Ray for these tests: pip install -e '.[test,ray]'") from None
        pytest.skip("Ray is not installed (pip install 'harness-ad[ray]')")
    return ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance whose workers find the toy plugins; yields (site folder, PYTHONPATH, address)."""
    ray = _need_ray()
    site = tmp_path_factory.mktemp("raytoys-site")
    install_entry_point(site)
    before = os.environ.get("PYTHONPATH")
    pythonpath = os.pathsep.join([str(site), str(TESTS)] + ([before] if before else []))
    # The local instance's processes inherit the driver's environment: so do its workers.
    os.environ["PYTHONPATH"] = pythonpath
    sys.path.insert(0, str(site))
    # Two CPUs and one per job: two worker processes, reused from test to test (each one's first
    # import of torch and of every plugin is the slow part).
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             logging_level=logging.WARNING)
    try:
        yield site, pythonpath, ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        sys.path.remove(str(site))
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def registry(cluster):
    """The registry the driver builds: installed entry points, the toys among them."""
    loaded = load_registry()
    assert "stepper" in loaded.methods and "toy" in loaded.datasets, [str(p) for p in loaded.problems]
    return loaded


def _options(root: Path, **changes) -> RunOptions:
    base = RunOptions(results_dir=root / "results", cache_dir=root / "cache", device="cpu", eval_size=32,
                      progress=False, latency_repeats=1, executor="ray", job_cpus=1, checkpoint_interval=0)
    return replace(base, **changes)


def _on_ray(registry, jobs, options, **executor_args):
    from harness.engine.executors.ray import RayExecutor

    return run_plan(registry, Planner(registry, options).plan(jobs), RayExecutor(options, **executor_args))


def _in_process(registry, jobs, options):
    return run_plan(registry, Planner(registry, replace(options, executor="inprocess")).plan(jobs))


def _record(options: RunOptions, job: Job) -> dict:
    return load_record(job.record_path(options.results_dir)).to_dict()


def _safetensors(path: Path) -> tuple[dict, dict]:
    """A safetensors file's tensors (as bytes) and metadata; its bytes vary from process to process
    (the header's metadata order), its content must not."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return {k: handle.get_tensor(k).tobytes() for k in handle.keys()}, dict(handle.metadata() or {})


def _job(method: str, protocol: str = "multiclass", shots=None, seed: int = 0, **overrides) -> Job:
    return Job(method, "toy", protocol, shots, seed, "tiny", tuple(sorted(overrides.items())))


# -- without a cluster --------------------------------------------------------------------------------
def test_missing_ray_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    spec = load_registry(entry_points=[]).executor("ray")
    with pytest.raises(UsageError, match=r"pip install 'harness-ad\[ray\]'"):
        spec.factory(RunOptions())


def test_requests_devices_and_feasibility():
    _need_ray()
    from harness.engine.executors.ray import check_requests, task_options, torch_threads, worker_device

    assert task_options(Resources(gpus=1, cpus=4, memory_gb=32), "auto") == {
        "num_cpus": 4.0, "num_gpus": 1.0, "memory": 32 * 2**30}
    assert task_options(Resources(gpus=1, cpus=0.25), "cpu") == {"num_cpus": 0.25, "num_gpus": 0.0}
    with pytest.raises(UsageError, match="whole number"):
        task_options(Resources(gpus=1.5), "cuda")
    assert torch_threads({"num_cpus": 0.25}) == 1 and torch_threads({"num_cpus": 4}) == 4

    assert worker_device("auto", [], None) == "cpu"
    assert worker_device("cpu", ["0"], "0") == "cpu"
    assert worker_device("auto", ["3"], "3") == "cuda:0"  # Ray made GPU 3 the only visible one
    assert worker_device("cuda:1", ["2", "5"], "2,5") == "cuda:0"
    assert worker_device("cuda", ["2"], None) == "cuda:2"  # Ray left CUDA_VISIBLE_DEVICES alone
    with pytest.raises(UsageError, match="--job-gpus 1"):
        worker_device("cuda", [], None)

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 64 * 2**30}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 512 * 2**30}}]
    too_big, memory = check_requests({
        "fits": ("a", {"num_cpus": 4, "num_gpus": 1, "memory": 32 * 2**30}),
        "gpus": ("b", {"num_cpus": 1, "num_gpus": 4}),
        "cpus": ("c", {"num_cpus": 16, "num_gpus": 0}),
        "memory": ("d", {"num_cpus": 1, "num_gpus": 0, "memory": 100 * 2**30}),
    }, nodes)
    assert set(too_big) == {"gpus", "cpus"} and set(memory) == {"memory"}
    assert "--job-gpus 2 or less" in too_big["gpus"] and "--job-cpus 8 or less" in too_big["cpus"]
    too_big, _ = check_requests({"gpu": ("e", {"num_cpus": 1, "num_gpus": 1})}, [nodes[0] | {"Resources": {"CPU": 2}}])
    assert "--job-gpus 0" in too_big["gpu"]


def test_an_address_nobody_answers_is_found_at_once():
    _need_ray()
    import socket

    from harness.engine.executors.ray import _unreachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert _unreachable(f"127.0.0.1:{port}") is None
    assert "nothing answers at 127.0.0.1" in _unreachable(f"127.0.0.1:{port}")  # closed now
    assert _unreachable("auto") is None and _unreachable("ray://head:10001") is None


def test_workers_load_only_the_entry_points_a_job_needs(toy_registry, tmp_path):
    _need_ray()
    from harness.engine.executors.ray import plugins_for

    # The toys of conftest's registry live in this process only: no worker could load them.
    with pytest.raises(UsageError, match="registered in this process only"):
        plugins_for(toy_registry, _job("meanimage"))
    site = tmp_path / "site"
    install_entry_point(site)
    sys.path.insert(0, str(site))
    try:
        installed = load_registry()
    finally:
        sys.path.remove(str(site))
    assert plugins_for(installed, _job("meanimage")) == (("raytoys", "ray_toys:plugin"),)


def test_artifacts_travel_from_a_scratch_folder_to_beside_the_record(tmp_path):
    _need_ray()
    from harness.engine.executors.ray import collect_artifacts, place_artifacts
    from harness.engine.support.fsutil import StorageError

    scratch = tmp_path / "scratch" / "tiny-seed0.json"
    (scratch.parent / "tiny-seed0.maps" / "all").mkdir(parents=True)
    scratch.write_text("{}")
    (scratch.parent / "tiny-seed0.maps" / "sample.safetensors").write_bytes(b"new sample")
    (scratch.parent / "tiny-seed0.maps" / "all" / "000-00000.safetensors").write_bytes(b"batch")
    (scratch.parent / "tiny-seed0.maps.tmp-123-abc").mkdir()  # left by an interrupted write
    (scratch.parent / "tiny-seed0.maps.tmp-123-abc" / "junk").write_bytes(b"junk")
    files = collect_artifacts(scratch)
    assert files == {"tiny-seed0.maps/all/000-00000.safetensors": b"batch",
                     "tiny-seed0.maps/sample.safetensors": b"new sample"}

    record = tmp_path / "results" / "tiny-seed0.json"
    (record.parent / "tiny-seed0.maps").mkdir(parents=True)
    (record.parent / "tiny-seed0.maps" / "stale.safetensors").write_bytes(b"old run")
    place_artifacts(record, files)
    placed = {p.relative_to(record.parent).as_posix() for p in record.parent.rglob("*") if p.is_file()}
    assert placed == set(files)  # the old folder was replaced whole, nothing else left behind
    assert (record.parent / "tiny-seed0.maps" / "sample.safetensors").read_bytes() == b"new sample"
    with pytest.raises(StorageError, match="does not belong"):
        place_artifacts(record, {"../elsewhere": b"x"})


# -- on the module's cluster ----------------------------------------------------------------------------
def test_ray_records_equal_in_process_records_and_a_rerun_skips_them(registry, tmp_path, monkeypatch):
    from harness.engine.executors.ray import RayExecutor

    jobs = [_job("meanimage"), _job("meanimage", "oneclass"), _job("meanimage", "fewshot", 2, seed=1),
            _job("stepper", seed=3), _job("raising")]
    here, there = _options(tmp_path / "inprocess"), _options(tmp_path / "ray")
    local = _in_process(registry, jobs, here)
    remote = _on_ray(registry, jobs, there)

    assert [o.status for o in remote.outcomes if o.job != jobs[-1]] == ["ok"] * 4
    assert remote.exit_code == local.exit_code == 1  # the raising job failed by itself; the others went on
    for job in jobs:
        mine, theirs = _record(here, job), _record(there, job)
        assert theirs["status"] == mine["status"], job.label
        assert theirs["metrics"] == mine["metrics"], job.label
        assert theirs["mean"] == mine["mean"], job.label
        assert theirs["run"]["executor"] == "ray" and mine["run"]["executor"] == "inprocess"
        assert theirs["run"]["ray"]["attempts"] == 1 and theirs["run"]["ray"]["retried_after"] == []
        assert theirs["run"]["ray"]["pid"] != os.getpid()  # it really ran in a worker
        assert theirs["run"]["ray"]["resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
        # The saved maps (--save-maps sample) came back with the record, the same tensors and facts.
        assert theirs["artifacts"] == mine["artifacts"], job.label
        if mine["artifacts"]:
            folder = mine["artifacts"]["maps"]["folder"]
            ours = job.record_path(here.results_dir).parent / folder
            sent = job.record_path(there.results_dir).parent / folder
            files = sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
            assert files and files == sorted(p.relative_to(sent) for p in sent.rglob("*") if p.is_file())
            assert all(_safetensors(ours / f) == _safetensors(sent / f) for f in files), job.label
    assert _record(there, jobs[-1])["error"]["phase"] == "predict"
    assert not [p for p in (there.results_dir / "records").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert _record(there, jobs[3])["method_info"]["steps"] == 6

    files = {job: job.record_path(there.results_dir).read_bytes() for job in jobs[:4]}
    again = _on_ray(registry, jobs, there)
    statuses = {o.job: o.status for o in again.outcomes}
    assert all(statuses[job] == "skipped" for job in jobs[:4])
    assert statuses[jobs[-1]] == "failed"  # a failed job is tried again, and fails again by itself
    assert all(job.record_path(there.results_dir).read_bytes() == data for job, data in files.items())

    # When every job is finished, the executor does not even need Ray.
    def no_ray(*args, **kwargs):
        raise AssertionError("connected to Ray with nothing to run")

    monkeypatch.setattr(RayExecutor, "_connect", no_ray)
    finished = _on_ray(registry, jobs[:4], there)
    assert [o.status for o in finished.outcomes] == ["skipped"] * 4 and finished.exit_code == 0


def test_lost_workers_are_retried_resume_from_checkpoints_and_fail_after_the_retries(registry, tmp_path):
    marker = tmp_path / "worker-died"
    dying = _job("stepper", die_marker=str(marker), die_at=3, steps=6)  # kills its worker once
    doomed = _job("stepper", die_always=True, die_at=1, steps=2)  # kills its worker every time
    jobs = [dying, doomed, _job("meanimage")]
    there = _options(tmp_path / "ray", retries=1)
    summary = _on_ray(registry, jobs, there)

    assert marker.exists(), "the worker never killed itself"
    record = _record(there, dying)
    assert record["status"] == "ok", record.get("error")
    assert record["run"]["ray"]["attempts"] == 2
    assert record["run"]["ray"]["retried_after"][0].startswith("WorkerCrashedError")
    assert int(marker.read_text()) != record["run"]["ray"]["pid"]  # the second attempt ran in a new process
    assert record["run"]["resumed_from"]["all"]["step"] == 3  # from the checkpoint the dead worker saved
    assert any(note.startswith(dying.label) and "retrying, attempt 2 of 2" in note for note in summary.notes)

    failed = _record(there, doomed)
    assert failed["status"] == "failed" and failed["error"]["phase"] == "worker"
    assert "lost 2 time(s), more than --retries 1" in failed["error"]["message"]
    assert failed["run"]["ray"]["attempts"] == 2 and len(failed["run"]["ray"]["retried_after"]) == 2
    assert [o.job for o in summary.failed] == [doomed] and summary.exit_code == 1
    assert _record(there, jobs[2])["status"] == "ok"  # the others went on

    # The job that died once equals the same job never interrupted, in process (the marker exists
    # now: nobody dies).
    here = _options(tmp_path / "inprocess")
    _in_process(registry, [dying], here)
    reference = _record(here, dying)
    assert "resumed_from" not in reference["run"]
    assert record["metrics"] == reference["metrics"]


def test_ctrl_c_cancels_running_jobs_keeps_finished_records_and_the_rerun_resumes(registry, tmp_path):
    slow = [_job("stepper", seed=s, steps=40, step_seconds=0.25) for s in (0, 1)]
    quick = _job("meanimage")
    jobs = [quick, *slow]
    # No checkpoint falls due by the clock: any the rerun finds was saved because of Ctrl-C.
    there = _options(tmp_path / "ray", checkpoint_interval=3600)
    fitting = [there.cache_dir / "jobs" / job.relative_path().with_suffix("") / "all" for job in slow]
    done = threading.Event()

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not done.is_set():
            if all(folder.is_dir() for folder in fitting) and quick.record_path(there.results_dir).exists():
                break
            time.sleep(0.1)
        time.sleep(1.0)  # a few steps into both fits
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        summary = _on_ray(registry, jobs, there, stop_grace=30)
    finally:
        done.set()
        presser.join()

    assert summary.interrupted and summary.exit_code == 130, summary.describe()
    assert _record(there, quick)["status"] == "ok"
    assert not any(job.record_path(there.results_dir).exists() for job in slow)
    assert any("2 job(s) were stopped before they finished" in note for note in summary.notes), summary.notes
    assert not list((there.results_dir / "locks").rglob("*.lock")), "locks left behind"
    for folder in fitting:
        assert list((folder / "checkpoints").glob("checkpoint-*.safetensors")), "no checkpoint saved on Ctrl-C"

    rerun = _on_ray(registry, jobs, there)
    assert rerun.exit_code == 0, rerun.describe()
    assert {o.job: o.status for o in rerun.outcomes} == {quick: "skipped", slow[0]: "ok", slow[1]: "ok"}
    for job in slow:
        record = _record(there, job)
        resumed = record["run"]["resumed_from"]["all"]
        assert 1 <= resumed["step"] < 40, resumed  # it went on from where Ctrl-C stopped it
        assert record["method_info"]["steps"] == 40


# -- the command line -----------------------------------------------------------------------------------
def _harness(*args, cwd: Path, pythonpath: str):
    env = {**os.environ, "PYTHONPATH": pythonpath}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def test_cli_joins_a_cluster_with_address(cluster, tmp_path):
    _, pythonpath, address = cluster
    args = ("run", "--executor", "ray", "--address", address, "--methods", "meanimage,stepper", "--datasets", "toy",
            "--profile", "tiny", "--device", "cpu", "--job-cpus", "1", "--eval-size", "32", "--no-progress",
            "--no-leaderboard", "--results-dir", "res", "--cache-dir", "cache")
    done = _harness(*args, cwd=tmp_path, pythonpath=pythonpath)
    assert done.returncode == 0, done.stderr
    assert "joined the cluster" in done.stderr and "2 job(s) finished, 0 skipped" in done.stderr
    records = sorted((tmp_path / "res" / "records").rglob("*.json"))
    assert len(records) == 2
    assert all(json.loads(p.read_text())["run"]["executor"] == "ray" for p in records)


def test_cli_starts_a_local_instance_and_refuses_jobs_no_node_can_run(cluster, tmp_path):
    _, pythonpath, _ = cluster
    done = _harness("run", "--executor", "ray", "--methods", "meanimage", "--datasets", "toy", "--profile", "tiny",
                    "--job-gpus", "1", "--no-progress", "--results-dir", "res", "--cache-dir", "cache",
                    cwd=tmp_path, pythonpath=pythonpath)
    assert done.returncode == 2, done.stderr
    assert "started a local instance" in done.stderr
    assert "asks Ray for 1 GPU(s)" in done.stderr and "--job-gpus 0" in done.stderr
    assert not (tmp_path / "res" / "records").exists()
