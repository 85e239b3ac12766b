"""Greedy coreset (k-center) selection, shared by memory-bank methods (PatchCore, LafitE).

PatchCore reduces its memory bank of N training patches to k = ratio * N patches chosen so that
every discarded patch is close to a kept one: the greedy k-center (farthest-point) heuristic,
which is within a factor 2 of the optimal covering radius. Its cost is O(N * k * d); two things
keep it fast and light here:

- a seeded Johnson-Lindenstrauss random projection to ``projection_dim`` dimensions, which
  preserves pairwise distances approximately (PatchCore projects to 128 as well);
- the running minimum distance is updated from one matrix-vector product per step,
  ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2``, in chunks of ``batch_size`` rows, so memory beyond the
  (projected) features is O(N), never O(N * k).

How the selection starts is the one place where implementations differ. The textbook greedy
k-center starts from one random row, which is the first row selected. PatchCore's code
(``ApproximateGreedyCoresetSampler`` of amazon-science/patchcore-inspection) instead draws 10
random rows, takes every row's *mean* distance to them as its initial distance, and selects first
the row farthest from them on average; the 10 rows themselves are not selected.
``starting_points`` chooses between the two (1: textbook; 10: PatchCore's code).
"""

from __future__ import annotations

import torch


def random_projection(features: torch.Tensor, dim: int, *, kind: str = "gaussian", seed: int = 0) -> torch.Tensor:
    """Project rows to ``dim`` dimensions with a seeded Johnson-Lindenstrauss matrix.

    Parameters
    ----------
    features : torch.Tensor of shape (N, D)
    dim : int
        Target dimension.
    kind : {"gaussian", "sparse"}, default "gaussian"
        ``gaussian``: entries N(0, 1/dim). ``sparse``: Achlioptas' database-friendly matrix with
        entries sqrt(3/dim) * {+1, 0, -1} drawn with probabilities {1/6, 2/3, 1/6}.
    seed : int, default 0

    Returns
    -------
    torch.Tensor of shape (N, dim), float32, on the device of ``features``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    d = features.shape[1]
    if kind == "gaussian":
        matrix = torch.randn(d, dim, generator=generator) / dim ** 0.5
    elif kind == "sparse":
        u = torch.rand(d, dim, generator=generator)
        matrix = ((u < 1 / 6).float() - (u > 5 / 6).float()) * (3.0 / dim) ** 0.5
    else:
        raise ValueError(f"unknown projection kind {kind!r}; use 'gaussian' or 'sparse'")
    return features.float() @ matrix.to(features.device)


def greedy_coreset(features: torch.Tensor, ratio: float = 0.1, *, n: int | None = None,
                   projection_dim: int | None = 128, projection: str = "gaussian", seed: int = 0,
                   batch_size: int = 65536, starting_points: int = 1) -> torch.Tensor:
    """Select rows that cover ``features`` well, by greedy k-center (farthest-point) selection.

    Starting from one seeded random row, each step adds the row whose distance to its nearest
    already-selected row is largest, then lowers every row's running minimum distance with the
    new row. The result is deterministic for a given ``seed`` (up to floating-point ties).

    Parameters
    ----------
    features : torch.Tensor of shape (N, D)
        The memory bank, on any device (the selection runs there).
    ratio : float, default 0.1
        Fraction of rows to keep, ``k = max(1, round(ratio * N))``; ignored when ``n`` is given.
    n : int, optional
        Number of rows to keep (clipped to [1, N]).
    projection_dim : int or None, default 128
        Select on a random projection to this many dimensions; ``None`` or a value >= D uses the
        features as they are.
    projection : {"gaussian", "sparse"}, default "gaussian"
        Kind of random projection, see :func:`random_projection`.
    seed : int, default 0
        Seeds the projection and the first row.
    batch_size : int, default 65536
        Rows per chunk of the distance update (bounds temporary memory).
    starting_points : int, default 1
        1: start from one seeded random row, which is selected first. m > 1: every row starts with
        its mean Euclidean distance to m seeded random rows and the first selection is the row
        with the largest (PatchCore's code, m = 10); the m rows are not selected as such.

    Returns
    -------
    torch.LongTensor of shape (k,)
        Indices of the selected rows, unique, in selection order, on the device of ``features``.

    Raises
    ------
    ValueError
        If ``features`` is not 2-D or is empty.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    total = features.shape[0]
    if total == 0:
        raise ValueError("cannot select a coreset of an empty feature set")
    k = int(n) if n is not None else int(round(total * float(ratio)))
    k = min(max(k, 1), total)
    generator = torch.Generator().manual_seed(int(seed))
    if projection_dim is not None and projection_dim < features.shape[1]:
        x = random_projection(features, int(projection_dim), kind=projection, seed=seed)
    else:
        x = features.float()
    first = int(torch.randint(total, (1,), generator=generator))
    starting_points = int(starting_points)
    if starting_points < 1:
        raise ValueError(f"starting_points must be >= 1, got {starting_points}")
    if k == total:
        # Everything is kept; still start with the seeded row so the order is well defined.
        order = torch.arange(total, device=features.device)
        return torch.cat([order[first:first + 1], order[:first], order[first + 1:]])

    # Distances are translation invariant; centring keeps |x|^2 small relative to the distances,
    # which limits cancellation in the expanded form below.
    x = x - x.mean(0)
    sq_norms = (x * x).sum(1)
    # Augmented rows [x, 1] and centre vector [-2c, |c|^2] turn the squared distance
    # |x|^2 - 2 x.c + |c|^2 into one fused addmv; few kernels per step matter on a CPU, where
    # every parallel kernel pays a thread barrier (costly when the cores are shared).
    x_aug = torch.cat([x, torch.ones(total, 1, device=x.device, dtype=x.dtype)], dim=1)
    min_dist = torch.empty(total, device=x.device, dtype=x.dtype)
    selected = torch.empty(k, dtype=torch.long, device=x.device)
    vec = torch.empty(x_aug.shape[1], device=x.device, dtype=x.dtype)
    if starting_points > 1:
        # PatchCore's start: the mean (plain, not squared) distance to m random rows. The running
        # minimum below works on squared distances, so the mean is squared to compare with them.
        m = min(starting_points, total)
        anchors = torch.randperm(total, generator=generator)[:m].to(x.device)
        mean_dist = torch.zeros(total, device=x.device, dtype=x.dtype)
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            d2 = sq_norms[start:stop, None] - 2.0 * x[start:stop] @ x[anchors].T + sq_norms[anchors][None]
            mean_dist[start:stop] = d2.clamp_min(0).sqrt().mean(1)
        min_dist = mean_dist * mean_dist
        current = torch.argmax(min_dist)
    else:
        current = torch.tensor(first, device=x.device)
    for step in range(k):
        selected[step] = current
        vec[:-1] = x[current] * -2.0
        vec[-1] = sq_norms[current]
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            # Squared distances (monotone in the distance, so the selection is the same); rounding
            # can make them slightly negative, which cannot change which row is farthest.
            d = torch.addmv(sq_norms[start:stop], x_aug[start:stop], vec)
            if step == 0 and starting_points == 1:
                min_dist[start:stop] = d
            else:
                torch.minimum(min_dist[start:stop], d, out=min_dist[start:stop])
        # Selected rows must never be picked again, even when duplicates leave every distance 0;
        # -1 is below any rounding error and survives every later running minimum, so marking
        # each row once suffices.
        min_dist[current] = -1.0
        # argmax stays on the device: no host synchronisation per step on a GPU.
        current = torch.argmax(min_dist)
    return selected.to(features.device)
