"""Every noise-drawing method predicts the same at any batch size, and reads no scalar per step.

Each method is fitted once at micro scale (seconds), then:

- **batch invariance** (DESIGN.md: inference noise is seeded per image): six images predicted in
  one call and in calls of 2 and 4 + 2, with the runner's per-image seeds, give bit-identical
  fp32 maps and scores on the CPU;
- **the evaluation's metrics** at ``eval_batch_size`` 2 and 8 (the runner's evaluator, per-image
  seeds, a test set with masks) are equal, so a faster batch size changes no reported number;
- **no host reads in the denoising loops**: ``aten::_local_scalar_dense`` (what ``.item()``,
  ``float(tensor)``, ``int(tensor)`` and ``if tensor:`` run) is counted in one ``predict``; the
  count may not grow with the batch nor with the number of denoising steps, and stays under
  :data:`MAX_SCALAR_READS` per call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import Sample, TrainSet
from harness.data import ImageCache
from harness.engine.inference.evaluation import Evaluator
from harness.method import image_seed
from harness.metrics.builtin import STANDARD_METRICS
from harness.engine.support.progress import Progress
from harness.testing import fit_context, tiny_dataset

#: Scalar reads one predict call may make, whatever its batch and step count.
MAX_SCALAR_READS = 4
#: Methods whose predictions agree across batches to a tolerance, not bit for bit: AnomalySD
#: inpaints flat (image, mask) chunks of ``inpaint_batch`` pairs, so a chunk's composition (and the
#: batch the CPU convolution kernels see) changes with the batch; the noise itself is per image.
#: DiAD: bit-identical noise, but the CPU convolution kernels of its VAE/UNet sum in another order
#: at another batch size (4.8e-7 on maps of magnitude 2 measured; scores were identical).
#: LafitE: the same on some CPUs (oneDNN picks its convolution kernels by batch size): bit for bit on
#: AMD Zen machines, 3e-4 on maps of magnitude 2000 (1.5e-7 relative) on a 2-core Xeon with AVX-512.
#: Tolerances are relative to the largest map value (at least 1).
CLOSE = {"anomalysd": 1e-5, "diad": 1e-5, "lafite": 1e-5}
SIZE = 32


class ScalarReads(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense`` calls (host reads of a tensor's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _train_set(cats=("disc", "weave"), n: int = 4) -> TrainSet:
    rng = np.random.default_rng(0)
    samples = []
    for c in cats:
        for i in range(n):
            img = (rng.random((SIZE, SIZE, 3)) * 120 + 60).astype(np.uint8)
            samples.append(Sample(f"{c}/train/good/{i}", c, "train", 0, "good", image=lambda a=img: a))
    return TrainSet("t", samples, (SIZE, SIZE), ImageCache())


def _fit(spec_module: str, overrides: dict[str, Any], tmp_path, **context) -> Any:
    import importlib

    (spec,) = importlib.import_module(spec_module).harness_methods()
    settings = spec.resolve("tiny", overrides)
    torch.manual_seed(0)
    method = spec.factory(settings)
    train = _train_set()
    method.fit(train, fit_context(settings, tmp_path, train=train, **context))
    return method.eval()


def _set_steps_diad(method, n):
    s = method.settings
    method.ddim = method.schedule.plan(n, s.start_step, s.noise_to_first_ddim_step)


def _set_steps_lafite(method, n):
    method.ddim_steps = n


#: method -> (plugin module, micro overrides, how to set the denoising steps or None).
METHODS: dict[str, tuple[str, dict[str, Any], Callable | None]] = {
    "diffusionad": ("harness_diffusionad.plugin",
                    {"image_size": SIZE, "base_channels": 8, "channel_mults": (1, 2), "norm_groups": 4,
                     "attention_resolutions": (16,), "seg_base_channels": 8, "seg_depth": 3, "epochs": 1,
                     "train_batch_size": 4, "top_k": 10}, None),
    "diad": ("harness_diad.plugin", {"ae_epochs": 1, "epochs": 1, "train_batch_size": 4, "ae_train_batch_size": 4,
                                     "ddim_steps": 4}, _set_steps_diad),
    "lafite": ("harness_lafite.plugin", {"image_size": SIZE, "feature_size": 4, "base_channels": 16, "norm_groups": 8,
                                         "epochs": 1, "train_batch_size": 4, "tau_grid": (10,), "k_grid": (2,),
                                         "ddim_steps": 2, "pseudo_val_per_category": 2, "score_pool_size": 4,
                                         "coreset_projection_dim": 16, "bootstrap_rounds": 2}, _set_steps_lafite),
    "anomalysd": ("harness_anomalysd.plugin", {"image_size": SIZE, "unet_epochs": 1, "decoder_epochs": 1,
                                               "scales": (1, 2), "denoising_steps": 4, "inpaint_batch": 8,
                                               "lambda_candidates": (0.3,), "lambda_val_per_category": 2}, None),
}


pytestmark = pytest.mark.slow  # four micro fits: minutes on 2 cores


@pytest.fixture(scope="module", params=sorted(METHODS))
def fitted(request, tmp_path_factory):
    module, overrides, set_steps = METHODS[request.param]
    pytest.importorskip(module.split(".")[0])
    context = {"textures": ("weave",)} if request.param in ("diffusionad", "anomalysd") else {}
    method = _fit(module, overrides, tmp_path_factory.mktemp(request.param), **context)
    return request.param, method, set_steps


def _batch(n: int = 6):
    torch.manual_seed(1)
    images = torch.rand(n, 3, SIZE, SIZE)
    categories = ["disc", "weave"] * (n // 2)
    seeds = [image_seed(0, f"{c}/test/good/{i:03d}") for i, c in enumerate(categories)]
    return images, categories, seeds


def _predict_in(method, sizes, images, categories, seeds):
    maps, scores, start = [], [], 0
    for size in sizes:
        out = method.predict(images[start:start + size], categories[start:start + size], seeds=seeds[start:start + size])
        maps.append(torch.as_tensor(out.anomaly_maps))
        scores.append(torch.as_tensor(out.image_scores))
        start += size
    return torch.cat(maps), torch.cat(scores)


def test_predictions_do_not_depend_on_the_batch(fitted):
    name, method, _ = fitted
    images, categories, seeds = _batch()
    whole = _predict_in(method, [6], images, categories, seeds)
    for sizes in ([2, 2, 2], [4, 2]):
        parts = _predict_in(method, sizes, images, categories, seeds)
        if name in CLOSE:
            scale = max(1.0, float(whole[0].abs().max()), float(whole[1].abs().max()))
            diff = max(float((whole[0] - parts[0]).abs().max()), float((whole[1] - parts[1]).abs().max())) / scale
            assert diff <= CLOSE[name], (name, sizes, diff)
        else:
            assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1]), (name, sizes)
    # The seeds matter: other seeds, other noise (PatchCore-like methods have none; all four here do).
    other = _predict_in(method, [6], images, categories, [s + 1 for s in seeds])
    assert not torch.equal(whole[0], other[0]), name


def _evaluate_at(method, batch_size: int) -> dict[str, dict[str, float]]:
    index = tiny_dataset(size=SIZE, n_test=6, name="batches")
    # The fitted categories' names: a method may look a category up.
    tests = {new: [dataclasses.replace(s, category=new) for s in index.categories[old].test]
             for old, new in (("alpha", "disc"), ("beta", "weave"))}
    method.eval_batch_size = batch_size
    evaluator = Evaluator("batches", STANDARD_METRICS, SIZE, torch.device("cpu"), ImageCache(), Progress(False),
                          latency_repeats=1, seed=0, min_calls=1)
    return evaluator.evaluate(method, tests)


def test_evaluation_metrics_do_not_depend_on_the_eval_batch_size(fitted):
    name, method, _ = fitted
    at_2, at_8 = _evaluate_at(method, 2), _evaluate_at(method, 8)
    assert set(at_2) == {"disc", "weave"} and all(np.isfinite(v["image_auroc"]) for v in at_2.values())
    if name in CLOSE:
        for category in at_2:
            assert at_2[category] == pytest.approx(at_8[category], abs=1e-4, nan_ok=True), (name, category)
    else:
        assert at_2 == at_8, name


def _reads(method, n: int) -> int:
    images, categories, seeds = _batch(n)
    counter = ScalarReads()
    with torch.no_grad(), counter:
        method.predict(images, categories, seeds=seeds)
    return counter.count


def test_scalar_reads_are_a_constant_per_batch(fitted):
    name, method, set_steps = fitted
    per_batch = {n: _reads(method, n) for n in (2, 4)}
    assert per_batch[2] == per_batch[4] <= MAX_SCALAR_READS, (name, per_batch)
    if set_steps is not None:
        set_steps(method, 2)
        few = _reads(method, 2)
        set_steps(method, 4)
        more = _reads(method, 2)
        assert few == more == per_batch[2], (name, few, more)


def test_compiled_inference_gives_the_eager_metrics(fitted):
    """``--compile default`` changes the speed, not the numbers: DiffusionAD's micro model (one
    compile, about 80 s on 2 cores; the others would add minutes each) evaluated eagerly and
    compiled by inductor gives the same metrics to 1e-4, with graphs really compiled, no fallback."""
    name, method, _ = fitted
    if name != "diffusionad":
        pytest.skip("one method's compile suffices (inductor's C++ builds take minutes per model on 2 cores)")
    from torch._dynamo.utils import counters

    from harness.engine.inference.acceleration import prepare_inference

    eager = _evaluate_at(method, 4)
    counters.clear()
    setup = prepare_inference(method, compile_mode="default")
    try:
        compiled = _evaluate_at(method, 4)
        assert counters["stats"]["unique_graphs"] > 0 and setup.fallback is None, dict(counters["stats"])
    finally:
        with pytest.warns(RuntimeWarning, match="running eagerly"):
            setup.fall_back(RuntimeError("test over"))  # uncompile: the module's fixture is shared
    for category in eager:
        assert compiled[category] == pytest.approx(eager[category], abs=1e-4), category
