"""The embedded synthetic dataset and the MVTec-layout export."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from harness.data import read_image, read_mask
from harness.errors import DatasetError
from harness.results.export import write_mvtec_layout
from harness.engine.registry import load_registry
from harness_synthetic import generator
from harness_synthetic.plugin import load_synthetic

SIZE = generator.IMAGE_SIZE


@pytest.fixture(scope="module")
def index():
    return load_synthetic()


def _clean_and_defective(category: str, test_index: int):
    """The scene before and after its defect, replaying the generator's own draws."""
    defect = generator.test_plan()[test_index][0]
    rng = np.random.default_rng((generator.CATEGORIES.index(category), 1, test_index))
    renderer = generator._RENDERERS[category]
    params = renderer.sample(rng)
    scene, fg = renderer.draw(params)
    after, mask = generator._apply_defect(defect, category, params, scene, fg, rng)
    return scene, after, mask, fg


def test_counts_per_category(index):
    assert list(index.categories) == list(generator.CATEGORIES)
    defects = {"good", "scratch", "hole", "stain", "missing_part", "misplaced_part"}
    for cat in index.categories.values():
        assert len(cat.train) == 40
        assert sum(s.label == 0 for s in cat.test) == 12
        assert sum(s.label == 1 for s in cat.test) == 18
        assert {s.defect for s in cat.test} == defects
        assert cat.has_masks
        keys = [s.key for s in cat.train + cat.test]
        assert len(set(keys)) == len(keys)


def test_train_samples_are_normal(index):
    for cat in index.categories.values():
        for s in cat.train:
            assert (s.split, s.label, s.defect, s.mask) == ("train", 0, "good", None)
            assert s.key.startswith(f"{cat.name}/train/good/")


def test_images_are_rgb_uint8(index):
    for cat in index.categories.values():
        for s in (cat.train[0], cat.test[0], cat.test[-1]):
            img = read_image(s.image)
            assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8


def test_loading_is_deterministic():
    first = load_synthetic(categories=["tiles", "pcb"])
    first_arrays = [(s.image(), s.mask() if s.mask else None)
                    for cat in first.categories.values() for s in cat.train[:3] + cat.test[10:16]]
    # The generator caches renderings; clear it so the second pass really renders again.
    generator._render_cached.cache_clear()
    second = load_synthetic(categories=["tiles", "pcb"])
    second_arrays = [(s.image(), s.mask() if s.mask else None)
                     for cat in second.categories.values() for s in cat.train[:3] + cat.test[10:16]]
    for (img_a, mask_a), (img_b, mask_b) in zip(first_arrays, second_arrays):
        np.testing.assert_array_equal(img_a, img_b)
        if mask_a is None:
            assert mask_b is None
        else:
            np.testing.assert_array_equal(mask_a, mask_b)


def test_images_differ_between_samples_and_splits(index):
    cat = index.categories["weave"]
    train = [s.image() for s in cat.train[:5]]
    test_good = [s.image() for s in cat.test if s.label == 0][:5]
    images = train + test_good
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])


def test_masks_exactly_for_anomalous_images(index):
    for cat in index.categories.values():
        for s in cat.test:
            if s.label == 0:
                assert s.mask is None and s.defect == "good"
                continue
            mask = read_mask(s.mask)
            assert mask.shape == (SIZE, SIZE)
            # Small to medium defects: roughly 0.2% to 6% of the image.
            assert 0.001 < mask.mean() < 0.08, (s.key, mask.mean())


@pytest.mark.parametrize("category", generator.CATEGORIES)
def test_defect_changes_only_the_masked_region(category):
    plan = generator.test_plan()
    for test_index in (i for i, (d, k) in enumerate(plan) if d != "good" and k == 0):
        scene, after, mask, _ = _clean_and_defective(category, test_index)
        diff = np.abs(after - scene).max(axis=2)
        assert mask.any()
        assert diff[~mask].max() < 0.03, plan[test_index]
        assert diff[mask].mean() > 0.008, plan[test_index]


@pytest.mark.parametrize("category", generator.CATEGORIES)
def test_every_surface_and_pattern_defect_is_visible(category):
    # Every one of them, not a sample: a defect fainter than the sensor noise is a wrong label.
    plan = generator.test_plan()
    for test_index, (defect, _) in enumerate(plan):
        if defect == "good" or (category in generator.OBJECTS and defect.endswith("_part")):
            continue
        scene, after, mask, _ = _clean_and_defective(category, test_index)
        assert generator.visible_change(scene, after, mask) >= generator.MIN_VISIBLE_CHANGE, plan[test_index]


@pytest.mark.parametrize("category", generator.OBJECTS)
def test_object_defects_lie_on_the_object(category):
    plan = generator.test_plan()
    for test_index in (i for i, (d, _) in enumerate(plan) if d != "good"):
        _, _, mask, fg = _clean_and_defective(category, test_index)
        # The silhouette with its holes filled: a moved hole changes pixels inside the old hole.
        silhouette = ndimage.binary_fill_holes(fg)
        assert (mask & silhouette).sum() >= 0.9 * mask.sum(), plan[test_index]


def test_unknown_category_raises():
    with pytest.raises(DatasetError, match="bottle") as err:
        load_synthetic(categories=["weave", "bottle"])
    assert "weave" in str(err.value) and "nut" in str(err.value)


def test_subset_keeps_requested_order():
    index = load_synthetic(root="/ignored", categories=["nut", "weave"])
    assert list(index.categories) == ["nut", "weave"]
    assert index.name == "synthetic" and index.root is None and index.problems == []


def test_plugin_is_registered():
    registry = load_registry()
    assert "synthetic" in registry.datasets
    spec = registry.dataset("synthetic")
    assert spec.needs_root is False and spec.find_root is None
    assert tuple(spec.categories) == generator.CATEGORIES
    assert spec.loader is load_synthetic


def test_write_mvtec_layout(tmp_path):
    index = load_synthetic(categories=["disc"])
    counts = write_mvtec_layout(index, tmp_path)
    assert counts == {"disc": {"train": 40, "test_good": 12, "test_anomalous": 18, "masks": 18}}
    root = tmp_path / "disc"
    assert sorted(p.name for p in (root / "train" / "good").iterdir())[:2] == ["000.png", "001.png"]
    assert len(list((root / "train" / "good").glob("*.png"))) == 40
    assert len(list((root / "test" / "good").glob("*.png"))) == 12
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(
        ["good", "scratch", "hole", "stain", "missing_part", "misplaced_part"])
    # Numbering restarts in each defect folder; every image has its mask with the same stem.
    for defect, n in {"scratch": 4, "hole": 4, "stain": 4, "missing_part": 3, "misplaced_part": 3}.items():
        images = sorted(p.name for p in (root / "test" / defect).iterdir())
        masks = sorted(p.name for p in (root / "ground_truth" / defect).iterdir())
        assert images == [f"{i:03d}.png" for i in range(n)]
        assert masks == [f"{i:03d}_mask.png" for i in range(n)]
    assert not (root / "ground_truth" / "good").exists()
    mask = np.asarray(Image.open(root / "ground_truth" / "hole" / "001_mask.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    sample = next(s for s in index.categories["disc"].test if s.key == "disc/test/hole/001")
    np.testing.assert_array_equal(mask > 0, sample.mask())
    np.testing.assert_array_equal(np.asarray(Image.open(root / "test" / "hole" / "001.png")), sample.image())
