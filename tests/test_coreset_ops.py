"""Tests of the shared memory-bank helpers: greedy coreset and the small tensor ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from harness.toolkit.coreset import greedy_coreset, random_projection
from harness.toolkit.ops import gaussian_blur, imagenet_normalize, nearest_neighbour_distance, resize_maps


def _clusters(n_clusters=5, per_cluster=200, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=gen) * 50
    points = centres.repeat_interleave(per_cluster, 0) + torch.randn(n_clusters * per_cluster, dim, generator=gen)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    return points, labels


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_coreset_covers_every_cluster(projection_dim):
    points, labels = _clusters()
    idx = greedy_coreset(points, n=5, projection_dim=projection_dim, seed=3)
    assert idx.dtype == torch.long and idx.shape == (5,)
    # Farthest-point selection must jump to a new cluster at every step.
    assert sorted(labels[idx].tolist()) == [0, 1, 2, 3, 4]


def test_coreset_ratio_unique_and_deterministic():
    points, _ = _clusters(per_cluster=100)
    idx = greedy_coreset(points, ratio=0.1, seed=1, batch_size=97)  # odd chunk exercises the chunking
    assert idx.numel() == 50 and idx.unique().numel() == 50
    assert idx.min() >= 0 and idx.max() < len(points)
    # Same arguments, same result (other chunk sizes may round differently and break near-ties).
    assert torch.equal(idx, greedy_coreset(points, ratio=0.1, seed=1, batch_size=97))
    assert greedy_coreset(points, ratio=0.1, seed=1).unique().numel() == 50


def test_coreset_matches_bruteforce_farthest_point():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(300, 6, generator=gen)
    idx = greedy_coreset(points, n=20, projection_dim=None, seed=2)
    chosen = [int(idx[0])]
    for _ in range(19):
        dmin = torch.cdist(points, points[chosen]).min(1).values
        chosen.append(int(dmin.argmax()))
    assert idx.tolist() == chosen


def test_coreset_duplicates_and_edge_cases():
    points = torch.zeros(10, 4)  # all distances 0: indices must still be unique
    idx = greedy_coreset(points, n=10)
    assert sorted(idx.tolist()) == list(range(10))
    assert greedy_coreset(points, ratio=0.0).numel() == 1
    with pytest.raises(ValueError):
        greedy_coreset(torch.zeros(5))
    sparse = random_projection(torch.randn(4, 100), 16, kind="sparse", seed=0)
    assert sparse.shape == (4, 16)


def test_coreset_with_starting_points_follows_patchcores_sampler():
    """m starting rows: first pick = the row with the largest mean distance to them, then farthest-point."""
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(200, 5, generator=gen)
    idx = greedy_coreset(points, n=12, projection_dim=None, seed=4, starting_points=10)
    # The anchors are drawn after the single-start row, from the same seeded generator.
    g = torch.Generator().manual_seed(4)
    torch.randint(200, (1,), generator=g)
    anchors = torch.randperm(200, generator=g)[:10]
    running = torch.cdist(points, points[anchors]).mean(1)
    chosen = []
    for _ in range(12):
        pick = int(running.argmax())
        chosen.append(pick)
        running = torch.minimum(running, torch.cdist(points, points[pick:pick + 1])[:, 0])
        running[chosen] = -1
    assert idx.tolist() == chosen
    assert idx.unique().numel() == 12
    # The start differs from the textbook one (a random row selected first).
    assert idx.tolist() != greedy_coreset(points, n=12, projection_dim=None, seed=4).tolist()
    with pytest.raises(ValueError, match="starting_points"):
        greedy_coreset(points, n=3, starting_points=0)


def test_imagenet_normalize():
    x = torch.ones(2, 3, 4, 4) * torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(imagenet_normalize(x), torch.zeros_like(x), atol=1e-6)


@pytest.mark.parametrize("sigma", [0.8, 2.0, 4.0])
@pytest.mark.parametrize("shape", [(2, 40, 33), (1, 1, 24, 30), (1, 8, 9)])
def test_gaussian_blur_matches_scipy(sigma, shape):
    rng = np.random.default_rng(0)
    maps = rng.random(shape).astype(np.float64)
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    axes = tuple(range(maps.ndim - 2, maps.ndim))
    # scipy filters every axis; restrict it to the two image axes with per-axis sigmas.
    sigmas = [0.0] * (maps.ndim - 2) + [sigma, sigma]
    reference = ndimage.gaussian_filter(maps, sigmas, mode="reflect", truncate=4.0)
    assert ours.shape == maps.shape
    assert np.abs(ours - reference).max() < 1e-4, axes


def test_gaussian_blur_float32_and_zero_sigma():
    maps = torch.rand(3, 16, 16)
    assert torch.equal(gaussian_blur(maps, 0), maps)
    out = gaussian_blur(maps, 4.0)
    assert out.dtype == torch.float32
    ref = ndimage.gaussian_filter(maps.numpy().astype(np.float64), (0, 4, 4), mode="reflect")
    assert np.abs(out.numpy() - ref).max() < 1e-4


def test_resize_maps_shapes():
    assert resize_maps(torch.rand(2, 8, 8), 32).shape == (2, 32, 32)
    assert resize_maps(torch.rand(2, 1, 8, 8), (16, 24)).shape == (2, 1, 16, 24)
    const = torch.full((1, 5, 5), 2.0)
    assert torch.allclose(resize_maps(const, 11), torch.full((1, 11, 11), 2.0))


def test_nearest_neighbour_distance_matches_bruteforce():
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(101, 7, generator=gen), torch.randn(53, 7, generator=gen)
    dist, idx = nearest_neighbour_distance(queries, bank, k=3, chunk=10)
    full = ((queries[:, None] - bank[None]) ** 2).sum(-1).sqrt()
    ref_dist, ref_idx = full.sort(1)
    assert dist.shape == (101, 3) and idx.shape == (101, 3)
    assert torch.allclose(dist, ref_dist[:, :3], atol=1e-4)
    assert torch.equal(idx, ref_idx[:, :3])
    assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_center_crop_box_rounds_like_torchvision_and_paste_fills_with_each_images_minimum():
    import torchvision.transforms.functional as TF

    from harness.toolkit.crops import center_crop, center_crop_box, paste_crop

    images = torch.arange(2 * 3 * 7 * 9, dtype=torch.float32).reshape(2, 3, 7, 9)
    box = center_crop_box((7, 9), 4)
    assert torch.equal(center_crop(images, box), TF.center_crop(images, [4, 4]))
    assert center_crop_box((7, 9), 0) == (0, 0, 7, 9) and center_crop_box((7, 9), 20) == (0, 0, 7, 9)
    maps = torch.rand(2, 4, 4) + torch.tensor([0.0, 5.0]).view(2, 1, 1)
    full = paste_crop(maps, box, (7, 9))
    assert full.shape == (2, 7, 9)
    assert torch.equal(center_crop(full, box), maps)
    outside = full.clone()
    outside[:, box.top:box.top + 4, box.left:box.left + 4] = float("nan")
    for i in range(2):
        ring = outside[i][~torch.isnan(outside[i])]
        assert torch.all(ring == maps[i].min())
    assert paste_crop(maps, center_crop_box((4, 4), 4), (4, 4)) is maps
