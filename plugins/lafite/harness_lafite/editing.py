"""Feature editing with a coreset memory bank (LafitE, Section 3.3, Eqs. 9 and 10).

Every feature slice (one position of the aggregated tensor) of every training image goes into a
memory bank, reduced to a greedy coreset (10 % in the paper). At inference each query slice is
replaced by a combination of its K nearest bank slices ``n_k`` at distances ``d_k``:

    e = sum_k (1 - softmax(d)_k) * n_k                                   (Eq. 10)

Taken literally the weights sum to K - 1 (so K = 1 gives e = 0 and K > 2 scales the slice up by
about K - 1): the edited tensor then lies far from the normal features the text says it stays
close to, and a search over K compares scales rather than neighbourhoods. ``"normalized"`` (the
default) divides the weights by K - 1 so that they sum to one (a convex combination of the
neighbours, the reading that agrees with the text); ``"literal"`` implements Eq. 10 exactly as
printed. K must be >= 2 for both.
"""

from __future__ import annotations

import torch

from harness.toolkit.coreset import greedy_coreset
from harness.toolkit.ops import nearest_neighbour_distance

WEIGHTINGS = ("normalized", "literal")


def coreset_bank(slices: torch.Tensor, ratio: float, projection_dim: int | None, seed: int) -> torch.Tensor:
    """Reduce a memory bank of feature slices to a greedy (k-center) coreset.

    Parameters
    ----------
    slices : torch.Tensor
        (N, C) every training feature slice (Eq. 9).
    ratio : float
        Fraction of slices kept (the paper's "keep rate", 0.1).
    projection_dim : int or None
        Random-projection size used while selecting (``None``: select on the full slices).
    seed : int

    Returns
    -------
    torch.Tensor
        (round(ratio * N), C), contiguous.
    """
    if not 0 < float(ratio) <= 1:
        raise ValueError(f"coreset_ratio must be in (0, 1], got {ratio!r}")
    keep = greedy_coreset(slices, float(ratio), projection_dim=projection_dim, seed=seed)
    return slices[keep].contiguous()


def editing_weights(distances: torch.Tensor, weighting: str = "normalized") -> torch.Tensor:
    """The weights of Eq. 10 for each query's K neighbours.

    Parameters
    ----------
    distances : torch.Tensor
        (M, K) Euclidean distances to the K nearest bank slices.
    weighting : {"normalized", "literal"}
        ``literal``: ``1 - softmax(d)`` as printed; ``normalized``: the same divided by K - 1.

    Returns
    -------
    torch.Tensor
        (M, K).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"editing_weights must be one of {WEIGHTINGS}, not {weighting!r}")
    k = distances.shape[1]
    if k < 2:
        raise ValueError(f"feature editing needs K >= 2 neighbours (Eq. 10 gives all-zero slices for K = 1), got {k}")
    # softmax is exp(d) / sum exp(d) computed without overflow for large distances.
    weights = 1.0 - torch.softmax(distances, dim=1)
    if weighting == "normalized":
        weights = weights / (k - 1)
    return weights


def edit_features(features: torch.Tensor, bank: torch.Tensor, k: int, weighting: str = "normalized",
                  chunk: int = 4096) -> torch.Tensor:
    """Replace every feature slice by the weighted combination of its K nearest bank slices.

    Parameters
    ----------
    features : torch.Tensor
        (B, C, h, w) query feature tensors.
    bank : torch.Tensor
        (M, C) the coreset memory bank.
    k : int
        Number of neighbours (>= 2).
    weighting : {"normalized", "literal"}
        See :func:`editing_weights`.
    chunk : int
        Queries per distance computation (bounds memory).

    Returns
    -------
    torch.Tensor
        The edited tensor ``e``, same shape as ``features``.
    """
    b, c, h, w = features.shape
    if bank.shape[0] < int(k):
        raise ValueError(f"the memory bank holds {bank.shape[0]} slices, fewer than K = {k}")
    queries = features.permute(0, 2, 3, 1).reshape(-1, c)
    distances, indices = nearest_neighbour_distance(queries, bank.to(queries.dtype), k=int(k), chunk=chunk)
    weights = editing_weights(distances, weighting)
    edited = torch.einsum("mk,mkc->mc", weights, bank.to(queries.dtype)[indices])
    return edited.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
