"""Fault injection: damaged files, kills, signals, concurrent runs, full disks, hostile caches, bad input.

Every case ends with nothing already computed lost and, where the user must act, one line naming
the file or folder and the fix. The subprocess cases run the test-only plugins of
``tests/testpkg/harness-faultkit`` (a slow, checkpointed method and a small dataset), installed
with pip like any third-party package.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.engine.support import fsutil
from harness.cli import main
from harness.data import read_image, read_mask
from harness.engine.support.fsutil import StorageError
from harness.engine.jobs import expand_jobs
from harness.results.leaderboard import build_leaderboard
from harness.engine.support.locks import JobLock
from harness.results.records import iter_records, load_record
from harness.engine.runner import Runner

REPO = Path(__file__).resolve().parents[1]
FAULTKIT = REPO / "tests" / "testpkg" / "harness-faultkit"


def _toy_jobs(seeds=(0,)):
    return expand_jobs(["meanimage"], ["toy"], "multiclass", None, list(seeds), {"toy": "tiny"})


# -- damaged records, caches and checkpoints ------------------------------------------------------

def test_a_damaged_record_is_moved_aside_redone_and_warned_about(toy_registry, run_options):
    jobs = _toy_jobs()
    first = Runner(toy_registry, run_options).run(jobs).outcomes[0]
    path = first.record_path
    path.write_text(path.read_text()[:40])  # truncated, as by a crash of another tool
    warnings = []
    board = build_leaderboard(run_options.results_dir, warn=warnings.append)
    assert any(str(path) in w for w in warnings) and "No records" in board
    again = Runner(toy_registry, run_options).run(jobs).outcomes[0]
    assert again.status == "ok" and load_record(path).ok
    assert (path.parent / (path.name + ".corrupt")).exists()


def test_leaderboard_command_warns_about_a_damaged_record_and_exits_0(toy_registry, run_options, capsys):
    Runner(toy_registry, run_options).run(_toy_jobs(seeds=(0, 1)))
    damaged = sorted((run_options.results_dir / "records").rglob("*.json"))[0]
    damaged.write_bytes(b"\x00\x01 not json")
    assert main(["leaderboard", "--results-dir", str(run_options.results_dir), "--no-reported"]) == 0
    captured = capsys.readouterr()
    assert str(damaged) in captured.err and "meanimage" in captured.out


def test_a_damaged_fit_cache_is_moved_aside_and_the_job_refits(toy_registry, run_options):
    jobs = _toy_jobs()
    first = Runner(toy_registry, run_options).run(jobs).outcomes[0]
    first.record_path.unlink()
    (cache,) = (run_options.cache_dir / "fits").rglob("*.safetensors")
    cache.write_bytes(cache.read_bytes()[:64])
    again = Runner(toy_registry, run_options).run(jobs).outcomes[0]
    assert again.status == "ok" and "fit_restored_from" not in again.record.method_info
    assert again.record.metrics == first.record.metrics
    assert cache.with_name(cache.name + ".corrupt").exists() and cache.exists()


class _Exploit:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_crafted_pickle_in_the_cache_folder_is_never_executed(toy_registry, run_options, tmp_path):
    jobs = _toy_jobs()
    first = Runner(toy_registry, run_options).run(jobs).outcomes[0]
    first.record_path.unlink()
    (cache,) = (run_options.cache_dir / "fits").rglob("*.safetensors")
    marker = tmp_path / "marker"
    payload = pickle.dumps({"state": _Exploit(marker)})
    cache.write_bytes(payload)  # where the fit cache is expected
    cache.with_suffix(".pt").write_bytes(payload)  # where earlier versions kept a pickled cache
    again = Runner(toy_registry, run_options).run(jobs).outcomes[0]
    assert again.status == "ok" and not marker.exists()


def test_no_code_loads_state_with_pickle():
    """Every torch.load in the project passes weights_only=True; nothing uses pickle.load."""
    offenders = []
    for folder in ("harness", "plugins", "datasets"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for number, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if "torch.load(" in code and "weights_only=True" not in code:
                    # A call may wrap: look at the following lines of the same statement.
                    statement = "\n".join(text.splitlines()[number - 1:number + 3])
                    if "weights_only=True" not in statement:
                        offenders.append(f"{path}:{number}")
                # Spelled in two parts so that this check does not find itself.
                if "pickle.load" in code or "weights_only=" + "False" in code:
                    offenders.append(f"{path}:{number}")
    assert not offenders, offenders


# -- locks, permissions, full disks -----------------------------------------------------------------

def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    lock_path = tmp_path / "job.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "x"}))
    lock = JobLock(lock_path)
    assert lock.acquire(timeout=5)
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path.exists()


def test_a_live_lock_makes_the_other_run_wait(tmp_path):
    holder = JobLock(tmp_path / "job.lock", heartbeat=0.1)
    assert holder.try_acquire()
    waiter = JobLock(tmp_path / "job.lock")
    assert not waiter.acquire(poll=0.05, timeout=0.3)
    holder.release()
    assert waiter.acquire(timeout=1)
    waiter.release()


def test_records_tables_and_caches_respect_the_umask(toy_registry, run_options, tmp_path):
    old = os.umask(0o002)
    try:
        Runner(toy_registry, run_options).run(_toy_jobs())
        main(["leaderboard", "--results-dir", str(run_options.results_dir), "--format", "csv,markdown",
              "--out", str(tmp_path / "board"), "--no-reported"])
    finally:
        os.umask(old)
    files = list((run_options.results_dir / "records").rglob("*.json")) + list((tmp_path / "board").iterdir())
    files += list((run_options.cache_dir / "fits").rglob("*.safetensors"))
    assert len(files) >= 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


def test_a_full_disk_leaves_no_partial_record_and_names_the_folder(toy_registry, run_options, monkeypatch):
    jobs = _toy_jobs(seeds=(0, 1))
    Runner(toy_registry, run_options).run(jobs[:1])
    good = jobs[0].record_path(run_options.results_dir)
    before = good.read_bytes()

    real_fsync = os.fsync

    def no_space_for_records(fd):
        # Only the records' folder is full: the fit cache of the second job is written fine.
        if "/records/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", no_space_for_records)
    with pytest.raises(StorageError, match="no space left in .*records"):
        Runner(toy_registry, run_options).run(jobs)
    monkeypatch.undo()
    target = jobs[1].record_path(run_options.results_dir)
    assert not target.exists() and not list(target.parent.glob("*.tmp")) and not list(target.parent.glob(".*.tmp"))
    assert good.read_bytes() == before
    # With space again, the rerun reuses the cached fit of the job whose record could not be written.
    again = Runner(toy_registry, run_options).run(jobs).outcomes
    assert [o.status for o in again] == ["skipped", "ok"]
    assert "fit_restored_from" in again[1].record.method_info


def test_a_full_disk_while_checkpointing_leaves_no_partial_file(tmp_path, monkeypatch):
    from harness.engine.support.state_io import save_state

    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(StorageError, match=str(tmp_path)):
        save_state(tmp_path / "checkpoint-00000001.safetensors", {"w": np.ones(10)})
    assert list(tmp_path.iterdir()) == []


def test_a_results_folder_that_is_a_file_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("oops")
    assert main(["run", "--methods", "patchcore", "--results-dir", "results", "--cache-dir", "cache",
                 "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["leaderboard", "--results-dir", "results"]) == 2


# -- bad input ----------------------------------------------------------------------------------------

def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["I;16", "P", "CMYK", "RGBA", "LA", "exif"])
def test_unusual_image_modes_read_as_rgb_uint8(tmp_path, mode):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    if mode == "I;16":
        value = (base[..., 0].astype(np.uint16) * 257)
        path = _save(Image.fromarray(value), tmp_path / "deep.png")  # a 16-bit greyscale PNG
        expected = np.repeat(base[..., :1], 3, axis=2)
    elif mode == "exif":
        image = Image.fromarray(base)
        exif = image.getexif()
        exif[0x0112] = 6  # rotated 90 degrees: viewers turn it upright
        path = _save(image, tmp_path / "photo.jpg", exif=exif, quality=100)
        expected = None
    elif mode == "CMYK":
        path = _save(Image.fromarray(base).convert("CMYK"), tmp_path / "print.jpg", quality=100)
        expected = None
    else:
        image = Image.fromarray(base).convert(mode if mode != "LA" else "LA")
        path = _save(image, tmp_path / f"img-{mode}.png")
        expected = np.asarray(image.convert("RGB"))
    array = read_image(path)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    if mode == "exif":
        assert array.shape[:2] == (16, 12)  # upright
    if expected is not None:
        assert np.abs(array.astype(int) - expected.astype(int)).max() <= 1


def test_masks_with_other_values_or_alpha_are_binarised_at_zero(tmp_path):
    values = np.zeros((8, 8), dtype=np.uint8)
    values[2:4, 2:4] = 1  # a 0/1 mask
    values[5, 5] = 128  # an anti-aliased edge
    assert read_mask(_save(Image.fromarray(values), tmp_path / "m.png")).sum() == 5
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque everywhere, like BMAD's label images
    rgba[1, 1, 0] = 200
    assert read_mask(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")).sum() == 1


def _folder_dataset(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for split, defect in (("train", "good"), ("test", "good"), ("test", "crack")):
        for i in range(n):
            _save(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                  root / "widget" / split / defect / f"{i:03d}.png")
    for i in range(n):
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[4:8, 4:8] = 255
        _save(Image.fromarray(mask), root / "widget" / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def _run_folder(tmp_path, root, *extra):
    return main(["run", "--methods", "patchcore", "--datasets", "folder", "--data-root", str(root), "--profile", "tiny",
                 "--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 *extra])


def test_a_truncated_test_image_is_reported_before_any_fit(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "data")
    broken = root / "widget" / "test" / "crack" / "001.png"
    broken.write_bytes(broken.read_bytes()[:60])
    assert _run_folder(tmp_path, root) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "re-extract" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
    assert _run_folder(tmp_path, root, "--dry-run") == 2
    assert str(broken) in capsys.readouterr().out


def test_a_mask_of_another_size_is_reported_before_any_fit(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "data")
    mask = root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    _save(Image.fromarray(np.zeros((10, 10), dtype=np.uint8)), mask)
    assert _run_folder(tmp_path, root) == 2
    assert str(mask) in capsys.readouterr().err


def test_an_empty_category_folder_is_a_data_error_naming_it(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "data")
    for path in (root / "widget" / "train" / "good").iterdir():
        path.unlink()
    assert _run_folder(tmp_path, root) == 2
    err = capsys.readouterr().err
    assert "folder/widget has no training images" in err


def test_a_dataset_root_behind_a_symlink_and_a_non_utf8_file_name_work(tmp_path, capsys):
    real = _folder_dataset(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    odd = os.fsencode(str(real / "widget" / "test" / "good")) + b"/\xff\xfeodd.png"
    Image.fromarray(np.full((16, 16, 3), 100, dtype=np.uint8)).save(os.fsdecode(odd))
    assert _run_folder(tmp_path, link, "--no-leaderboard") == 0, capsys.readouterr().err
    (record,) = [r for _, r in iter_records(tmp_path / "results")]
    assert record["status"] == "ok" and record["efficiency"]["n_test_images"] == 7


def test_a_malformed_reported_row_is_one_warning_line(tmp_path, toy_registry, run_options, capsys):
    Runner(toy_registry, run_options).run(_toy_jobs())
    reported = tmp_path / "reported"
    reported.mkdir()
    (reported / "paper.csv").write_text("paper,table,method,dataset,protocol,shots,category,metric,value\n"
                                        "P,1,m,toy,multiclass,,mean,image_auroc,97.0\n"
                                        "P,1,m,toy,multiclass,,mean,image_ap,ninety\n")
    assert main(["leaderboard", "--results-dir", str(run_options.results_dir), "--reported-dir", str(reported)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "paper.csv" in err and "line 3" in err


def test_resc_as_its_authors_released_it_is_read(tmp_path):
    from harness_benchmarks.medical import load_resc

    root = tmp_path / "RESC"
    rng = np.random.default_rng(2)
    for folder, n in (("Train/train/good", 3), ("Test/test/good", 2), ("Test/test/Ungood", 2)):
        for i in range(n):
            _save(Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)), root / folder / f"{i:03d}.png")
    for i in range(2):
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[i:i + 4, 2:6] = 255
        _save(Image.fromarray(mask), root / "Test" / "test_label" / "Ungood" / f"{i:03d}.png")
    index = load_resc(root)
    category = index.categories["resc"]
    assert len(category.train) == 3 and len(category.test) == 4
    anomalous = [s for s in category.test if s.label == 1]
    assert all(s.mask is not None for s in anomalous)
    assert read_mask(anomalous[1].mask)[1:5, 2:6].all()
    assert not index.problems, index.problems


# -- kills, signals and concurrent runs (subprocesses) ------------------------------------------------

@pytest.fixture(scope="module")
def faultkit(tmp_path_factory) -> Path:
    """The test-only plugin package, pip-installed into its own folder."""
    site = tmp_path_factory.mktemp("faultkit-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(FAULTKIT)], check=True, capture_output=True, timeout=300)
    return site


def _harness(site: Path, workdir: Path, log: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")])),
               HARNESS_FAULTKIT_LOG=str(log))
    command = [sys.executable, "-m", "harness", "run", "--methods", "slowtoy", "--datasets", "dots",
               "--results-dir", "results", "--cache-dir", "cache", "--no-progress", "--no-leaderboard",
               "--save-maps", "none", *args]
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(log: Path, n: int, timeout: float = 600) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if log.exists() and sum(" step " in f" {line}" for line in log.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the fit never reached step {n}: {log.read_text() if log.exists() else 'no log'}")


def _only_record(workdir: Path) -> dict:
    records = [r for _, r in iter_records(workdir / "results")]
    assert len(records) == 1, records
    return records[0]


@pytest.fixture(scope="module")
def uninterrupted(faultkit, tmp_path_factory) -> dict:
    """The record of an uninterrupted slowtoy job."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = _harness(faultkit, workdir, workdir / "log", "--set", "step_seconds=0")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    return _only_record(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143)])
def test_a_killed_or_terminated_fit_resumes_to_the_same_metrics(faultkit, uninterrupted, tmp_path, sig, code):
    log = tmp_path / "log"
    proc = _harness(faultkit, tmp_path, log, "--checkpoint-interval", "0")
    _wait_for_steps(log, 10)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode == code
    assert not list((tmp_path / "results").rglob("*.json")), "an interrupted job must not leave a record"
    assert list((tmp_path / "cache").rglob("checkpoint-*.safetensors")), "the fit in progress was checkpointed"
    again = _harness(faultkit, tmp_path, log, "--checkpoint-interval", "0")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    record = _only_record(tmp_path)
    resumed = record["run"]["resumed_from"]["all"]
    assert resumed["stage"] == "train" and resumed["step"] >= 9  # the step logged last may not be saved yet
    assert record["metrics"] == uninterrupted["metrics"]


@pytest.mark.slow
def test_two_runs_of_the_same_job_train_it_once_and_both_end_0(faultkit, uninterrupted, tmp_path):
    log = tmp_path / "log"
    first = _harness(faultkit, tmp_path, log)
    second = _harness(faultkit, tmp_path, log)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert sum("fit-start" in line for line in log.read_text().splitlines()) == 1
    assert _only_record(tmp_path)["metrics"] == uninterrupted["metrics"]
    assert any("running in another process" in err for _, err in outputs)


def test_data_summary_notes_what_reading_converts(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "data")
    deep = root / "widget" / "train" / "good" / "000.png"
    Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)).save(deep)
    assert main(["data", "summary", "--dataset", "folder", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "note: widget: 1 image(s) 16-bit greyscale, scaled to 8 bits" in out and str(deep) in out
