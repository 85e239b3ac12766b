"""Specifications that plugins return from their hooks.

A spec is a plain, frozen description of something a plugin provides: a method, a dataset or a
metric. The core validates every spec when it loads it (see :mod:`harness.registry`), so a
missing field is reported with the plugin that declared it instead of failing mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from harness.data import DatasetIndex
    from harness.method import Method

#: The protocols the core knows (see :mod:`harness.protocols`).
PROTOCOLS = ("multiclass", "fewshot", "oneclass")


@dataclass(frozen=True)
class PaperRef:
    """Bibliographic reference of the paper a method reproduces.

    Attributes
    ----------
    title : str
        Full title of the paper.
    venue : str
        Where and when it appeared, e.g. ``"CVPR 2022"``.
    url : str
        A stable link (arXiv, DOI or proceedings page).
    code : str
        The authors' code, if public; empty otherwise.
    """

    title: str
    venue: str = ""
    url: str = ""
    code: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """Description of an anomaly detection method.

    Attributes
    ----------
    name : str
        Identifier used on the command line (``--methods NAME``); lower case.
    paper : PaperRef
        The paper the ``paper`` profile reproduces.
    protocols : tuple of str
        Protocols the method supports, a subset of :data:`PROTOCOLS`.
    profiles : mapping of str to mapping
        Named settings. ``paper`` reproduces the paper; ``tiny`` runs the same code at toy scale on
        a CPU. Every profile must define every setting the factory reads.
    factory : callable
        ``factory(settings) -> Method``. It builds the architecture only: pretrained weights are
        loaded in :meth:`Method.fit`, so that building under ``torch.device("meta")`` needs no
        files and no memory (``harness describe`` relies on this).
    settings_help : mapping of str to str
        One line of documentation per setting.
    description : str
        One paragraph shown by ``harness describe``.
    """

    name: str
    paper: PaperRef
    protocols: tuple[str, ...]
    profiles: Mapping[str, Mapping[str, Any]]
    factory: Callable[[Mapping[str, Any]], "Method"]
    settings_help: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """Description of a dataset and how to load it.

    Attributes
    ----------
    name : str
        Identifier used on the command line (``--datasets NAME``).
    categories : tuple of str
        All categories of the full dataset, in the papers' order.
    loader : callable
        ``loader(root, categories) -> DatasetIndex``. ``root`` is a path (or ``None`` for datasets
        that need no files); ``categories`` is ``None`` for all of them. It must raise
        :class:`harness.errors.DatasetError` naming the file and the expected layout when the
        tree is wrong.
    find_root : callable or None
        ``find_root() -> path or None``: where to look when the user gave no ``--data-root``
        (an environment variable, a conventional folder). ``None`` means a root is required.
    description : str
        One line shown by ``harness list``.
    needs_root : bool
        False for datasets generated in memory (the synthetic set).
    official_counts : mapping of str to mapping
        Published image counts per category, ``{category: {"train": n, "test_normal": n,
        "test_anomalous": n}}``; ``harness data summary`` compares the counts it finds with them
        and warns about a partial download. Empty when nothing is published.

    An empty ``categories`` tuple means the categories are discovered in the root (a user's own
    folder of data).
    """

    name: str
    categories: tuple[str, ...]
    loader: Callable[[Any, Sequence[str] | None], "DatasetIndex"]
    find_root: Callable[[], Any] | None = None
    description: str = ""
    needs_root: bool = True
    official_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSpec:
    """Description of a per-category metric.

    Attributes
    ----------
    name : str
        Key under which the value is stored in records, e.g. ``"pixel_aupro"``.
    level : str
        ``"image"``, ``"pixel"`` or ``"efficiency"``.
    higher_is_better : bool
        Direction, used to mark the best value in tables.
    compute : callable
        ``compute(scores) -> float`` where ``scores`` is a :class:`harness.metrics.CategoryScores`
        holding the image scores, labels, anomaly maps and masks of one category. Returns a
        fraction in [0, 1], or NaN when the metric is undefined for that category.
    label : str
        Short column title for tables, e.g. ``"P-AUPRO"``.
    in_mad : bool
        Whether the metric is one of those averaged into mAD.
    """

    name: str
    level: str
    higher_is_better: bool
    compute: Callable[[Any], float]
    label: str = ""
    in_mad: bool = False


def missing_fields(spec: Any, required: Sequence[str]) -> list[str]:
    """Return the names in ``required`` that ``spec`` lacks or leaves empty.

    Parameters
    ----------
    spec : object
        The spec to check.
    required : sequence of str
        Attribute names that must be present and non-empty.

    Returns
    -------
    list of str
        The offending names, in the order given.
    """
    out = []
    for name in required:
        value = getattr(spec, name, None)
        if value is None or (isinstance(value, (str, tuple, list, dict)) and len(value) == 0):
            out.append(name)
    return out
