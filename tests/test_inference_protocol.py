"""The timing protocol, per-image seeds, the inference setup (precision, TF32, compile) and FLOPs."""

from __future__ import annotations

import pytest
import torch

from harness.engine.inference.efficiency import PredictTimer, median_iqr
from harness.engine.inference.flops import flop_counter, limit_share, peak_tflops
from harness.engine.jobs import expand_jobs
from harness.method import accepts_seeds, call_predict, image_seed
from harness.results.records import read_record
from harness.engine.runner import Runner
from harness.toolkit.noise import ImageNoise

TIMING_FIELDS = ("fps", "per_image_ms_median", "per_image_ms_iqr", "timed_calls", "timed_images", "warmup_calls",
                 "cold_call_ms", "cold_call_batch", "latency_ms", "latency_ms_iqr", "latency_calls",
                 "eval_batch_size", "eval_batch_size_source", "precision", "precision_mode", "tf32", "compile",
                 "flops_per_image", "cudnn", "diffusers", "limit_share", "limit_mode")


def _jobs(methods):
    return expand_jobs(methods, ["toy"], "multiclass", None, [0], {"toy": "tiny"})


def test_timer_files_the_first_call_of_each_shape_as_warm_up():
    timer = PredictTimer(torch.device("cpu"))
    for n in (4, 4, 2, 4, 2):
        timer.time(lambda: None, n, shape=(n, 3, 8, 8))
    assert timer.warmup_ms and len(timer.warmup_ms) == 2 and timer.cold_call_batch == 4
    assert timer.warm_calls == 3 and timer.warm_images == 10 and timer.images == 16
    summary = timer.summary()
    assert summary["timed_calls"] == 3 and summary["warmup_calls"] == 2 and summary["fps_over"] == "warm calls"
    timer.new_method()
    timer.time(lambda: None, 4, shape=(4, 3, 8, 8))
    assert len(timer.warmup_ms) == 3  # a new method warms its shapes again


def test_median_iqr():
    assert median_iqr([]) == (None, None, None)
    assert median_iqr([2.0]) == (2.0, 2.0, 2.0)
    med, q1, q3 = median_iqr([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (med, q1, q3) == (3.0, 2.0, 4.0)


def test_record_carries_the_timing_protocol(toy_registry, run_options):
    run_options.latency_repeats = 5
    summary = Runner(toy_registry, run_options).run(_jobs(["meanimage"]))
    eff = read_record(summary.outcomes[0].record_path)["efficiency"]
    missing = [f for f in TIMING_FIELDS if f not in eff]
    assert not missing, missing
    # 16 images at batch 4: one warm-up call, then warm calls (at least min_timed_calls of them).
    assert eff["timed_calls"] >= 5 and eff["warmup_calls"] == 1 and eff["latency_calls"] == 5
    assert eff["n_test_images"] == 16 and eff["fps"] > 0 and eff["cold_call_ms"] > 0
    assert eff["precision_mode"] == "fp32" and eff["compile"] == "none" and eff["tf32"] == {"matmul": False,
                                                                                            "cudnn": False}
    assert eff["eval_batch_size_source"] == "method setting"
    env = read_record(summary.outcomes[0].record_path)["environment"]
    assert env["precision"] == "fp32" and env["tf32"] == "off" and env["compile"] == "none"


def test_eval_batch_size_option_changes_no_metric(toy_registry, run_options, tmp_path):
    means = []
    for size in ("2", "auto"):
        run_options.results_dir = tmp_path / f"r{size}"
        run_options.eval_batch_size = size
        summary = Runner(toy_registry, run_options).run(_jobs(["meanimage"]))
        record = read_record(summary.outcomes[0].record_path)
        means.append(record["metrics"])
        assert record["efficiency"]["eval_batch_size"] == (2 if size == "2" else 4)
    assert means[0] == means[1]


def test_image_seed_depends_on_job_seed_and_key_only():
    assert image_seed(0, "a/test/good/000") == image_seed(0, "a/test/good/000")
    assert image_seed(0, "a/test/good/000") != image_seed(1, "a/test/good/000")
    assert image_seed(0, "a/test/good/000") != image_seed(0, "a/test/good/001")
    assert 0 <= image_seed(3, "x") < 2**63


def test_old_predict_signatures_are_called_without_seeds():
    class Old:
        def predict(self, images, categories):
            return "old"

    class New:
        def predict(self, images, categories, seeds=None):
            return seeds

    assert not accepts_seeds(Old()) and accepts_seeds(New())
    assert call_predict(Old(), None, [], [1]) == "old" and call_predict(New(), None, [], [1, 2]) == [1, 2]


def test_image_noise_is_the_same_in_any_batch():
    whole = ImageNoise([11, 12, 13, 14], 4, "cpu", base=5).randn((2, 3, 3))
    parts = torch.cat([ImageNoise([11, 12], 2, "cpu", base=5).randn((2, 3, 3)),
                       ImageNoise([13, 14], 2, "cpu", base=5).randn((2, 3, 3))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, ImageNoise([11, 12, 13, 14], 4, "cpu", base=6).randn((2, 3, 3)))
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        ImageNoise([1, 2], 3, "cpu")


def test_flop_counter_counts_cdist_and_cpu_attention():
    a, b = torch.randn(100, 64), torch.randn(500, 64)
    counter = flop_counter()
    with counter:
        torch.cdist(a, b)
    assert counter.get_total_flops() >= 2 * 100 * 500 * 64
    q = torch.randn(1, 2, 16, 8)
    counter = flop_counter()
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 4 * 2 * 16 * 16 * 8


def test_limit_share_uses_the_peak_of_the_mode():
    assert peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", "tf32") == pytest.approx(378.0)
    assert peak_tflops("cpu", "fp32") is None
    share = limit_share(1e12, 100.0, "NVIDIA H200", "bf16", tf32=False)
    assert share["limit_mode"] == "bf16" and share["limit_share"] == pytest.approx(100 / 989.4, rel=1e-3)
    assert limit_share(1e12, 100.0, "NVIDIA A100-SXM4-80GB", "fp32", tf32=True)["peak_tflops"] == 156.0
    assert limit_share(1e9, 10.0, None, "fp32", tf32=False)["limit_share"] is None


class _Conv:
    """A method-like object with one small convolutional network."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 1, 1))
        self.device = torch.device("cpu")

    def networks(self):
        return {"net": self.net}


def test_cast_mode_casts_once_and_accepts_float32_inputs():
    from harness.engine.inference.acceleration import prepare_inference

    method = _Conv()
    x = torch.rand(2, 3, 16, 16)
    reference = method.net(x)
    setup = prepare_inference(method, "bf16", "cast", "none")
    assert all(p.dtype == torch.bfloat16 for p in method.net.parameters())
    assert setup.cast_networks == ["net"] and setup.channels_last == ["net"]
    out = method.net(x)  # a float32 input is cast on the way in
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=0.05)
    assert setup.record()["precision_mode"] == "bf16-cast"


def test_autocast_mode_and_fp32_leave_the_weights_alone():
    from harness.engine.inference.acceleration import prepare_inference

    for precision, mode in (("bf16", "autocast"), ("fp32", "cast")):
        method = _Conv()
        setup = prepare_inference(method, precision, mode, "none")
        assert all(p.dtype == torch.float32 for p in method.net.parameters()) and not setup.cast_networks


def test_compile_failure_falls_back_to_eager_with_a_warning():
    from harness.engine.inference.acceleration import InferenceSetup

    method = _Conv()
    method.net._compiled_call_impl = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inductor broke"))
    setup = InferenceSetup(compile="default", compiled=["net"], _nets=method.networks())
    with pytest.warns(RuntimeWarning, match="inductor broke"):
        assert setup.fall_back(RuntimeError("inductor broke"))
    assert method.net._compiled_call_impl is None and "inductor broke" in setup.fallback
    assert not setup.fall_back(RuntimeError("again"))  # once only
    method.net(torch.rand(1, 3, 8, 8))
