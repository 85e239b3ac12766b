"""The evaluation grid: the harness's one rule, and each paper's own (``--eval-grid paper``)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from harness import EvalGrid
from harness.errors import UsageError
from harness.engine.inference.evaluation import grid_map, grid_mask
from harness.engine.jobs import expand_jobs
from harness.results.records import read_record
from harness.engine.runner import Runner
from harness.specs import harness_grid

for _plugin in ("diffusionad", "diad", "lafite", "patchcore"):
    try:
        __import__(f"harness_{_plugin}")
    except ImportError:  # not installed: import from the source tree
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / _plugin))


def _blob(shape=(100, 150)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[40:47, 60:90] = True
    mask[10, 10] = True  # a one-pixel defect that down-sampling blurs away or keeps
    return mask


def _spec(name: str):
    module = __import__(f"harness_{name}.plugin", fromlist=["harness_methods"])
    (spec,) = module.harness_methods()
    return spec


def test_harness_grid_is_nearest_neighbour_and_binary():
    mask = _blob()
    out = grid_mask(mask, harness_grid(64))
    expected = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((64, 64), Image.NEAREST)) > 0
    assert out.shape == (64, 64) and np.array_equal(out, expected)


def test_diffusionad_paper_grid_is_cv2_bilinear_then_integer_truncation():
    grid = _spec("diffusionad").paper_grid(_spec("diffusionad").resolve("paper"))
    mask = _blob()
    resized = cv2.resize(mask.astype(np.uint8) * 255, (256, 256), interpolation=cv2.INTER_LINEAR)
    expected = (resized / 255.0).astype(int) == 1
    out = grid_mask(mask, grid)
    assert np.array_equal(out, expected)
    # Truncation keeps fewer pixels than "> 0" would: the blurred rim is not a defect.
    assert out.sum() < (resized > 0).sum()


def test_diad_paper_grid_is_pillow_bilinear_then_nonzero():
    grid = _spec("diad").paper_grid(_spec("diad").resolve("paper"))
    mask = _blob()
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((256, 256), Image.BILINEAR))
    assert np.array_equal(grid_mask(mask, grid), resized > 0)
    assert grid_mask(mask, grid).sum() > grid_mask(mask, harness_grid(256)).sum()


def test_lafite_paper_grid_is_uniads_224():
    grid = _spec("lafite").paper_grid(_spec("lafite").resolve("paper"))
    assert grid.size == 224 and grid.mask_interpolation == "nearest"
    assert grid_mask(_blob(), grid).shape == (224, 224)
    # A 224-px map is compared as it is, not upsampled to 256.
    amap = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    assert np.array_equal(grid_map(amap, (100, 150), grid), amap)


def test_patchcore_paper_grid_resizes_the_shorter_side_and_crops():
    spec = _spec("patchcore")
    grid = spec.paper_grid(spec.resolve("paper"))
    mask = _blob((100, 150))  # a 2:3 image: 256 x 384 after the shorter-side resize
    out = grid_mask(mask, grid)
    assert out.shape == (224, 224)
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((384, 256), Image.BILINEAR))
    assert np.array_equal(out, resized[16:240, 80:304] >= 255)
    amap = np.random.default_rng(1).random((256, 384)).astype(np.float32)
    assert np.array_equal(grid_map(amap, (100, 150), grid), amap[16:240, 80:304])


def test_every_paper_grid_is_described():
    from harness.cli import describe_method

    for name in ("diffusionad", "diad", "lafite", "patchcore"):
        info = describe_method(_spec(name), "paper")
        assert info["paper_grid"]["name"] == "paper" and info["paper_grid"]["note"]


def test_paper_grid_jobs_are_recorded_apart_and_say_which_grid(toy_registry, run_options):
    harness_jobs = expand_jobs(["meanimage"], ["toy"], "multiclass", None, [0], {"toy": "tiny"})
    paper_jobs = expand_jobs(["meanimage"], ["toy"], "multiclass", None, [0], {"toy": "tiny"}, eval_grid="paper")
    run_options.eval_size_source = "default"
    runner = Runner(toy_registry, run_options)
    first = runner.run(harness_jobs).outcomes[0]
    second = runner.run(paper_jobs).outcomes[0]
    assert second.status == "ok" and first.record_path != second.record_path
    assert second.record_path.name.endswith("-papergrid.json")
    assert read_record(first.record_path)["run"]["eval_grid"]["name"] == "harness"
    grid = read_record(second.record_path)["run"]["eval_grid"]
    assert grid["name"] == "paper" and "declares no paper grid" in grid["note"]
    from harness.results.leaderboard import collect

    frame = collect(run_options.results_dir)
    assert set(frame["overrides"]) == {"", "eval_grid=paper"}


def test_paper_grid_with_an_explicit_eval_size_is_a_usage_error(toy_registry, run_options):
    jobs = expand_jobs(["meanimage"], ["toy"], "multiclass", None, [0], {"toy": "tiny"}, eval_grid="paper")
    with pytest.raises(UsageError, match="--eval-size"):
        Runner(toy_registry, run_options).plan(jobs)


def test_a_declared_paper_grid_reaches_the_evaluator(toy_registry, run_options):
    """A method's declared grid (here a 16-px truncating one) decides the masks the metrics see."""
    import dataclasses

    provided = toy_registry.methods["meanimage"]
    grid = EvalGrid(name="paper", size=16, mask_interpolation="bilinear", mask_binarize="truncate", note="toy")
    toy_registry.methods["meanimage"] = dataclasses.replace(
        provided, spec=dataclasses.replace(provided.spec, paper_grid=lambda settings: grid))
    run_options.eval_size_source = "default"
    jobs = expand_jobs(["meanimage"], ["toy"], "multiclass", None, [0], {"toy": "tiny"}, eval_grid="paper")
    plan = Runner(toy_registry, run_options).plan(jobs)
    assert plan.jobs[0].grid == grid and plan.jobs[0].eval_size == 16
    outcome = Runner(toy_registry, run_options).run(plan).outcomes[0]
    record = read_record(outcome.record_path)
    assert record["status"] == "ok" and record["run"]["eval_grid"]["size"] == 16
    assert record["run"]["eval_size"] == 16
