"""Specifications that plugins return from their hooks.

A spec is a plain, frozen description of something a plugin provides: a method, a dataset, a
metric or an executor. The core validates every spec when it loads it (see
:mod:`harness.engine.registry`), so a missing field or a profile naming an unknown setting is reported
with the plugin that declared it instead of failing mid-run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from harness.settings import Setting, Settings, SettingsSchema, schema_from_profiles

if TYPE_CHECKING:  # pragma: no cover
    from harness.data import DatasetIndex
    from harness.method import Method

#: The protocols the core knows (see :mod:`harness.engine.protocols`).
PROTOCOLS = ("multiclass", "fewshot", "oneclass")
#: Metric levels.
LEVELS = ("image", "pixel", "efficiency")


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
class Resources:
    """What one job of a method asks an executor for.

    Attributes
    ----------
    gpus : float
        GPUs (fractions allowed, as in Ray); 0 for a CPU job.
    cpus : float
        CPU cores.
    memory_gb : float
        Host memory; 0 = unspecified.
    """

    gpus: float = 0.0
    cpus: float = 1.0
    memory_gb: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """JSON form (plans and records)."""
        return {"gpus": float(self.gpus), "cpus": float(self.cpus), "memory_gb": float(self.memory_gb)}


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file (or model folder) a job needs, pinned.

    Attributes
    ----------
    key : str
        Short identifier, unique within the method (``harness weights list`` shows it).
    what : str
        Human description for messages, e.g. ``"ImageNet WideResNet-50-2 (torchvision V1)"``.
    filenames : tuple of str
        Names under which the file is looked for in ``--weights-dir`` and the torch hub cache,
        in order of preference.
    repo_id, revision, filename : str
        Where ``harness weights pull`` fetches it with ``huggingface_hub``: repository, pinned
        revision (commit or tag) and the file in it; ``filename`` empty with ``folder`` for a
        whole snapshot (a diffusers pipeline).
    url : str
        A plain download URL fetched with ``torch.hub`` instead of the hub (torchvision files).
    sha256 : str
        Hex digest; when set, ``harness weights verify`` and the preflight check it.
    setting : str
        The setting that may name an explicit path for this file (tried first).
    folder : bool
        A model folder rather than one file.
    allow_patterns : tuple of str
        For a folder: the files of the snapshot that are pulled.
    refuse : tuple of str
        File names that look right but are the wrong weights (e.g. a V2 torchvision file);
        finding one is an error explaining why.
    refuse_sha256 : tuple of str
        Hex sha256 digests, or prefixes of them (torchvision names carry the first 8 hex digits),
        of files that are the wrong weights: such a file is refused under any name.
    """

    key: str
    what: str
    filenames: tuple[str, ...] = ()
    repo_id: str = ""
    revision: str = ""
    filename: str = ""
    url: str = ""
    sha256: str = ""
    setting: str = ""
    folder: bool = False
    allow_patterns: tuple[str, ...] = ()
    refuse: tuple[str, ...] = ()
    refuse_sha256: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"key": self.key, "what": self.what, "filenames": list(self.filenames), "repo_id": self.repo_id,
                "revision": self.revision, "filename": self.filename, "url": self.url, "sha256": self.sha256,
                "setting": self.setting, "folder": self.folder}


@dataclass(frozen=True)
class DataNeed:
    """Data a job needs besides its dataset (anomaly-source textures, a pretraining set, ...).

    The preflight checks each need before any job runs: the setting must name an existing path,
    else the run stops (exit 2) with a message naming the setting, what it is and how to get it.

    Attributes
    ----------
    setting : str
        The setting that holds the path (``dtd_root``: the same name in every plugin).
    what : str
        What the data is, for messages, e.g. ``"the Describable Textures Dataset (DTD) images"``.
    how : str
        How to get it (a URL and what to unpack).
    kind : str
        ``folder`` or ``file``.
    random_weights_fallback : str
        When not empty, what stands in for the data under ``--weights random`` (a fast dev run
        of the paper profile then needs no download); the need is waived there.
    """

    setting: str
    what: str
    how: str
    kind: str = "folder"
    random_weights_fallback: str = ""

    def problem(self, method: str, value: str, random_weights: bool) -> str | None:
        """Why this need is not met by ``value`` (the setting's value), or None."""
        if random_weights and self.random_weights_fallback:
            return None
        fix = f"{self.how}; then pass --set {method}.{self.setting}=PATH"
        if not value:
            return f"{method} needs {self.what} (setting {self.setting} is empty): {fix}"
        exists = os.path.isdir(value) if self.kind == "folder" else os.path.isfile(value)
        if not exists:
            return f"{method}: {self.setting}={value} is not an existing {self.kind} ({self.what}): {fix}"
        return None

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``harness describe``)."""
        return {"setting": self.setting, "what": self.what, "how": self.how, "kind": self.kind,
                "random_weights_fallback": self.random_weights_fallback}


#: ``--eval-grid`` choices: the harness's one rule for every method, or each paper's own grid.
EVAL_GRIDS = ("harness", "paper")
#: How a grid turns a resized mask into defect pixels: ``nonzero`` (any value above 0) or
#: ``truncate`` (``int(value / 255)``: only pixels that stay fully 255 after resizing).
MASK_BINARIZE = ("nonzero", "truncate")


@dataclass(frozen=True)
class EvalGrid:
    """The pixel grid on which maps and masks are compared (see :mod:`harness.engine.inference.evaluation`).

    The harness grid (the default, one rule for every method) is ``size`` x ``size`` over the
    whole image, masks resized by nearest neighbour and binarised at > 0, maps resized
    bilinearly. A method may declare its paper's grid (``MethodSpec.paper_grid``) so that
    ``--eval-grid paper`` reproduces the paper's number: the masks are then transformed exactly
    as the authors' data loader transforms them, and the maps are brought onto the same pixels.

    Attributes
    ----------
    name : str
        ``harness`` or ``paper``.
    size : int or None
        Side of the grid (the shorter side with ``resize_mode="shorter_side"``); None keeps each
        mask's native resolution.
    resize_mode : str
        ``square`` or ``shorter_side`` (aspect ratio kept; :func:`harness.data.resized_shape`).
    crop : int
        Side of the centre crop taken after resizing (torchvision's rounding; 0: none).
    mask_interpolation : str
        ``nearest`` or ``bilinear``: how the 0/255 mask is resized.
    mask_antialias : bool
        Pillow's filter (true, as torchvision's ``Resize`` on a PIL mask) or ``cv2.resize``.
    mask_binarize : str
        ``nonzero`` or ``truncate`` (:data:`MASK_BINARIZE`).
    note : str
        Whose grid this is, in words (recorded).
    """

    name: str = "harness"
    size: int | None = 256
    resize_mode: str = "square"
    crop: int = 0
    mask_interpolation: str = "nearest"
    mask_antialias: bool = True
    mask_binarize: str = "nonzero"
    note: str = ""

    def __post_init__(self) -> None:
        if self.name not in EVAL_GRIDS:
            raise ValueError(f"EvalGrid.name must be one of {EVAL_GRIDS}, not {self.name!r}")
        if self.mask_binarize not in MASK_BINARIZE:
            raise ValueError(f"EvalGrid.mask_binarize must be one of {MASK_BINARIZE}, not {self.mask_binarize!r}")
        if self.mask_interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"EvalGrid.mask_interpolation must be 'nearest' or 'bilinear', not "
                             f"{self.mask_interpolation!r}")
        if self.resize_mode not in ("square", "shorter_side"):
            raise ValueError(f"EvalGrid.resize_mode must be 'square' or 'shorter_side', not {self.resize_mode!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the record's ``run.eval_grid``)."""
        return {"name": self.name, "size": self.size or "native", "resize_mode": self.resize_mode, "crop": self.crop,
                "mask_interpolation": self.mask_interpolation, "mask_antialias": self.mask_antialias,
                "mask_binarize": self.mask_binarize, "note": self.note}


def harness_grid(size: int | None) -> EvalGrid:
    """The harness's common grid at ``size`` (None: native resolution)."""
    return EvalGrid(name="harness", size=size, note="the harness's grid: masks resized by nearest neighbour and "
                    "binarised at > 0, maps resized bilinearly, the whole image")


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
        Named overrides of the declared settings. ``paper`` reproduces the paper; ``tiny`` runs
        the same code at toy scale on a CPU. With ``settings`` declared, a profile lists only
        what differs from the defaults; without (the earlier API) every profile defines every
        setting and the types are inferred.
    factory : callable
        ``factory(settings) -> Method`` with ``settings`` a :class:`harness.Settings`. It builds
        the architecture only: pretrained weights are loaded in :meth:`Method.fit`, so building
        under ``torch.device("meta")`` needs no files and no memory (``harness describe`` relies
        on this).
    settings : sequence of Setting
        Every setting, typed, with its default and help (:mod:`harness.settings`).
    settings_help : mapping of str to str
        The earlier API: one line of help per setting, for specs without ``settings``.
    description : str
        One paragraph shown by ``harness describe``.
    paper_protocol : str
        The protocol the paper's own numbers were made under (``oneclass`` for a method the
        paper trains per class); a run under another protocol says so in its record.
    resources : mapping of str to Resources
        What a job asks an executor for, per profile name (missing: one CPU, no GPU).
    weights : callable, optional
        ``weights(settings) -> sequence of WeightFile``: the pretrained files a job with these
        settings loads (none when its settings ask for random initialisation). The preflight
        checks them and ``harness weights`` lists, verifies and pulls them.
    paper_grid : callable, optional
        ``paper_grid(settings) -> EvalGrid``: the pixel grid of the paper's own evaluation code,
        used with ``--eval-grid paper`` (none declared: the harness rule at the method's size).
    data_needs : callable, optional
        ``data_needs(settings) -> sequence of DataNeed``: data a job with these settings reads
        besides its dataset (checked by the preflight before any job runs).
    """

    name: str
    paper: PaperRef
    protocols: tuple[str, ...]
    profiles: Mapping[str, Mapping[str, Any]]
    factory: Callable[[Settings], "Method"]
    settings: Sequence[Setting] = ()
    settings_help: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    paper_protocol: str = ""
    resources: Mapping[str, Resources] = field(default_factory=dict)
    weights: Callable[[Settings], Sequence[WeightFile]] | None = None
    paper_grid: Callable[[Settings], EvalGrid] | None = None
    data_needs: Callable[[Settings], Sequence["DataNeed"]] | None = None

    @cached_property
    def schema(self) -> SettingsSchema:
        """The typed settings: declared, or inferred from the profiles (earlier API)."""
        if self.settings:
            return SettingsSchema(tuple(self.settings))
        return schema_from_profiles(self.profiles, self.settings_help)

    def resolve(self, profile: str, overrides: Mapping[str, Any] = ()) -> Settings:
        """The settings of ``profile`` with ``overrides`` (already typed values) applied."""
        return self.schema.resolve(self.profiles[profile], overrides)

    def resources_for(self, profile: str) -> Resources:
        """What a job with ``profile`` asks for."""
        return self.resources.get(profile, Resources())

    def weight_files(self, settings: Settings) -> list[WeightFile]:
        """The pinned files a job with ``settings`` needs."""
        return list(self.weights(settings)) if self.weights is not None else []

    def needs(self, settings: Settings) -> list[DataNeed]:
        """The data a job with ``settings`` reads besides its dataset."""
        return list(self.data_needs(settings)) if self.data_needs is not None else []


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
    textures : tuple of str
        The categories that are textures (a surface filling the frame) rather than objects, as
        the dataset's authors classify them; methods that treat the two differently read it
        from ``FitContext.textures``.
    default_profile : str
        The profile ``--profile auto`` picks on this dataset (``tiny`` for data made for CPU
        runs, ``paper`` for the real benchmarks).
    options : mapping of str to str
        Loader options and their help (see the attribute).

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
    textures: tuple[str, ...] = ()
    default_profile: str = "paper"
    #: Options the loader takes as keyword arguments (``--data-option KEY=VALUE``): ``{key: help}``.
    options: Mapping[str, str] = field(default_factory=dict)


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
        value (a fraction in [0, 1] for the accuracy metrics), or NaN when the metric is
        undefined for that category.
    label : str
        Short column title for tables, e.g. ``"P-AUPRO"`` (default: the name).
    in_mad : bool
        Whether the metric is one of those averaged into mAD.
    scale : float
        Factor applied for display (100: a fraction shown in percent; 1: shown as stored).
    datasets : tuple of str
        Only computed on these datasets (empty: on every dataset), e.g. DICE on medical sets.
    description : str
        One line for ``harness list`` and the report.
    needs_maps : bool
        Whether ``compute`` reads the anomaly maps and masks (then the runner keeps a
        category's maps in memory for it); False for a metric computed from the exact engine's
        values alone (e.g. DICE).
    """

    name: str
    level: str
    higher_is_better: bool
    compute: Callable[[Any], float]
    label: str = ""
    in_mad: bool = False
    scale: float = 100.0
    datasets: tuple[str, ...] = ()
    description: str = ""
    needs_maps: bool = True

    @property
    def title(self) -> str:
        """The column title: ``label`` or the name."""
        return self.label or self.name

    def applies_to(self, dataset: str) -> bool:
        """Whether the metric is computed on ``dataset``."""
        return not self.datasets or dataset in self.datasets


@dataclass(frozen=True)
class ExecutorSpec:
    """An engine that runs planned jobs (in process, Ray, SLURM, ...).

    Attributes
    ----------
    name : str
        Identifier for ``harness run --executor NAME``.
    factory : callable
        ``factory(options) -> Executor`` where ``options`` is the run's
        :class:`harness.engine.runner.RunOptions`; the executor's ``run(plan, runner)`` returns a
        :class:`harness.engine.runner.RunSummary` (see :mod:`harness.engine.executors`).
    description : str
        One line for ``harness list``.
    """

    name: str
    factory: Callable[[Any], Any]
    description: str = ""


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
