"""The embedded synthetic dataset, as a harness dataset plugin.

Six small categories (three textures, three objects) rendered procedurally in memory, so that
``harness run`` and the tests work with no download. Images are generated lazily by the
callables stored in each :class:`harness.Sample`.
"""

from __future__ import annotations

from typing import Sequence

from harness import CategoryData, DatasetError, DatasetIndex, DatasetSpec, Sample, hookimpl
from harness_synthetic.generator import CATEGORIES, N_TRAIN, TEXTURES, render_sample, test_plan


def _image_source(category: str, split: str, index: int):
    # Default arguments bind the values now; a plain closure over loop variables would not.
    def image(category=category, split=split, index=index):
        return render_sample(category, split, index)[0]
    return image


def _mask_source(category: str, index: int):
    def mask(category=category, index=index):
        return render_sample(category, "test", index)[1]
    return mask


def _category(category: str) -> CategoryData:
    train = [Sample(key=f"{category}/train/good/{i:03d}", category=category, split="train", label=0,
                    defect="good", image=_image_source(category, "train", i)) for i in range(N_TRAIN)]
    test = []
    for index, (defect, i) in enumerate(test_plan()):
        label = int(defect != "good")
        test.append(Sample(key=f"{category}/test/{defect}/{i:03d}", category=category, split="test", label=label,
                           defect=defect, image=_image_source(category, "test", index),
                           mask=_mask_source(category, index) if label else None))
    return CategoryData(name=category, train=train, test=test)


def load_synthetic(root=None, categories: Sequence[str] | None = None) -> DatasetIndex:
    """Index the synthetic dataset; nothing is rendered until an image is read.

    Parameters
    ----------
    root : ignored
        Accepted for the loader signature; the dataset lives in memory.
    categories : sequence of str, optional
        Categories to include, in the given order; ``None`` for all of them.

    Returns
    -------
    DatasetIndex
        Per category 40 normal training images and 30 test images (12 good, 18 anomalous with
        masks), all 128×128 RGB.

    Raises
    ------
    DatasetError
        When a requested category does not exist; the message lists the valid ones.
    """
    wanted = list(CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in wanted if c not in CATEGORIES]
    if unknown:
        raise DatasetError(f"unknown synthetic categories {unknown}; valid categories: {', '.join(CATEGORIES)}")
    return DatasetIndex(name="synthetic", categories={c: _category(c) for c in wanted}, root=None, problems=[])


@hookimpl
def harness_datasets():
    """Register the synthetic dataset."""
    return [DatasetSpec(name="synthetic", categories=CATEGORIES, loader=load_synthetic, find_root=None,
                        description="Embedded procedural set: 3 textures + 3 objects, 128 px, 5 defect kinds",
                        needs_root=False, textures=TEXTURES,
                        # Made to run offline on a CPU: --profile auto picks each method's tiny profile.
                        default_profile="tiny")]
