"""The resize a method declares (interpolation, antialias, resize_mode) is the one the data layer applies."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from harness import Sample
from harness.data import ImageCache, TrainSet, resize_image, resized_shape


def _image(h=120, w=180, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.mark.parametrize("interpolation,flag", [("bilinear", cv2.INTER_LINEAR), ("bicubic", cv2.INTER_CUBIC),
                                                ("nearest", cv2.INTER_NEAREST)])
def test_antialias_false_is_cv2_resize_exactly(interpolation, flag):
    image = _image()
    ours = resize_image(image, (64, 64), interpolation, antialias=False)
    assert np.array_equal(ours, cv2.resize(image, (64, 64), interpolation=flag))


def test_antialias_true_is_pillows_filter_and_differs_from_cv2_when_shrinking():
    image = _image()
    ours = resize_image(image, (64, 64), "bilinear", antialias=True)
    assert np.array_equal(ours, np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR)))
    assert not np.array_equal(ours, resize_image(image, (64, 64), "bilinear", antialias=False))


def test_shorter_side_is_torchvisions_resize_with_an_int():
    import torchvision.transforms as T

    for h, w in ((1000, 1500), (1500, 1000), (333, 500), (256, 256)):
        image = _image(h, w, seed=h)
        expected = np.asarray(T.Resize(256)(Image.fromarray(image)))
        ours = resize_image(image, (256, 256), "bilinear", antialias=True, mode="shorter_side")
        assert ours.shape[:2] == resized_shape((h, w), (256, 256), "shorter_side") == expected.shape[:2]
        assert np.array_equal(ours, expected)


def test_the_cache_keeps_each_rule_apart_and_batches_split_by_shape():
    wide, tall = _image(100, 150, 1), _image(150, 100, 2)
    samples = [Sample(f"c/train/good/{i}", "c", "train", 0, "good", image=lambda a=a: a)
               for i, a in enumerate([wide, wide, tall])]
    cache = ImageCache()
    a = cache.image("d", samples[0], (32, 32), "bilinear", antialias=True)
    b = cache.image("d", samples[0], (32, 32), "bilinear", antialias=False)
    assert not np.array_equal(a, b)
    train = TrainSet("d", samples, (32, 32), cache, "bilinear", antialias=False, mode="shorter_side")
    shapes = [tuple(x.shape) for x, _ in train.batches(3)]
    assert shapes == [(2, 3, 32, 48), (1, 3, 48, 32)]


def test_methods_declare_their_resize():
    from harness.cli import describe_method
    from harness_diad.plugin import harness_methods as diad
    from harness_diffusionad.plugin import harness_methods as diffusionad
    from harness_lafite.plugin import harness_methods as lafite
    from harness_patchcore.plugin import harness_methods as patchcore

    rules = {spec.name: describe_method(spec, "paper") for spec in (diffusionad()[0], patchcore()[0], diad()[0],
                                                                    lafite()[0])}
    # DiffusionAD: cv2.resize (no antialiasing); the others: torchvision's Resize on PIL images.
    assert (rules["diffusionad"]["interpolation"], rules["diffusionad"]["antialias"]) == ("bilinear", False)
    assert rules["patchcore"]["resize_mode"] == "shorter_side" and rules["patchcore"]["antialias"] is True
    assert rules["diad"]["antialias"] is True and rules["diad"]["resize_mode"] == "square"
    assert rules["lafite"]["antialias"] is True and rules["lafite"]["interpolation"] == "bilinear"
