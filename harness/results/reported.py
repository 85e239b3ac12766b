"""The numbers the papers reported, read from the CSV files under ``results/reported/``.

Each CSV has the columns ``paper, table, method, dataset, protocol, shots, category, metric,
value``:

- ``value`` is in percent, exactly as printed in the paper (not a fraction);
- ``shots`` is empty unless the protocol is ``fewshot`` (``0`` means zero-shot);
- ``category`` is a category name or ``mean`` (the paper's average row);
- ``metric`` uses the harness's metric names (``image_auroc`` ... ``pixel_aupro``).

Decisions
---------
- A missing folder, or one without CSV files, gives an empty frame: the leaderboard of our own
  results must never depend on the papers' numbers being present.
- A file that lacks a required column, or a row whose value is not a number, is skipped with a
  warning naming the file, for the same reason; the rest still loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from harness.errors import HarnessWarning

REPORTED_COLUMNS = ("paper", "table", "method", "dataset", "protocol", "shots", "category", "metric", "value")
_TEXT_COLUMNS = ("paper", "table", "method", "dataset", "protocol", "category", "metric")

#: Every method name the CSV files may use, with the label the papers print. One name per method,
#: the one its harness plugin registers (``stfpm``, never ``stpm``; ``csflow``, never ``cs-flow``),
#: so a reported row and our records of the same method meet under one name.
REPORTED_METHODS: dict[str, str] = {
    "anoddpm": "AnoDDPM", "anomalydino": "AnomalyDINO", "anomalysd": "AnomalySD", "cfa": "CFA",
    "cflow": "CFLOW", "csflow": "CS-Flow", "cutpaste": "CutPaste", "ddpm": "DDPM", "diad": "DiAD",
    "diffnet": "DiffNet", "diffusionad": "DiffusionAD", "dinomaly": "Dinomaly", "draem": "DRAEM", "dsr": "DSR",
    "efficientad": "EfficientAD", "fastflow": "FastFlow", "favae": "FAVAE", "glass": "GLASS",
    "inpformer": "INP-Former", "lafite": "LafitE", "ldm": "LDM", "mkd": "MKD", "padim": "PaDiM",
    "patchcore": "PatchCore", "patchsvdd": "PatchSVDD", "rd4ad": "RD4AD", "regad": "RegAD",
    "sd": "SD", "spade": "SPADE", "spd": "SPD", "stfpm": "STFPM", "supersimplenet": "SuperSimpleNet",
    "tdg": "TDG", "uniad": "UniAD", "uninet": "UniNet", "winclip": "WinCLIP",
}


def method_label(name: str) -> str:
    """The printed label of a method name (the name itself when it is not a reported one)."""
    return REPORTED_METHODS.get(name, name)


def empty_reported() -> pd.DataFrame:
    """An empty frame with the columns and dtypes :func:`load_reported` returns.

    Returns
    -------
    pandas.DataFrame
        No rows; ``shots`` is nullable ``Int64`` and ``value`` is ``float``.
    """
    frame = pd.DataFrame({name: pd.Series(dtype=object) for name in REPORTED_COLUMNS})
    return _typed(frame)


def _typed(frame: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Give text columns ``object`` dtype, ``shots`` ``Int64`` and ``value`` ``float``; keep ``extra``."""
    frame = frame.copy()
    for name in _TEXT_COLUMNS:
        frame[name] = frame[name].astype(object)
    frame["shots"] = frame["shots"].astype("Int64")
    frame["value"] = frame["value"].astype(float)
    return frame[list(REPORTED_COLUMNS) + [c for c in extra if c in frame.columns]]


def _read_one(path: Path, keep_text: bool = False) -> pd.DataFrame | None:
    """Read one CSV; ``None`` (with a warning) when it lacks a required column."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in REPORTED_COLUMNS if c not in raw.columns]
    if missing:
        warnings.warn(f"{path}: skipped, missing column(s) {', '.join(missing)}", HarnessWarning, stacklevel=3)
        return None
    raw = raw[list(REPORTED_COLUMNS)].apply(lambda column: column.str.strip())
    # Empty shots means "not few-shot"; "0" stays 0 (zero-shot), so the two never match.
    shots = pd.to_numeric(raw["shots"].replace("", None), errors="coerce")
    values = pd.to_numeric(raw["value"], errors="coerce")
    bad = values.isna() | (shots.isna() & (raw["shots"] != ""))
    if bad.any():
        lines = ", ".join(str(int(i) + 2) for i in raw.index[bad][:10])
        warnings.warn(f"{path}: skipped {int(bad.sum())} row(s) with a non-numeric value or shots (line {lines}); "
                      "fix or delete those rows", HarnessWarning, stacklevel=3)
    # "text" is the value as printed ("100", "97.0"): a paper's table is shown with its own digits.
    raw = raw.assign(shots=shots, value=values, text=raw["value"])[~bad]
    return _typed(raw, ("text",) if keep_text else ())


def load_reported(reported_dir: Path | str | None, keep_text: bool = False) -> pd.DataFrame:
    """Every reported number from the CSV files in ``reported_dir``.

    Parameters
    ----------
    reported_dir : path or None
        Folder of CSV files (``results/reported``). ``None`` or a missing folder gives an
        empty frame.
    keep_text : bool
        Add a column ``text``: each value exactly as written in its file.

    Returns
    -------
    pandas.DataFrame
        Columns ``paper, table, method, dataset, protocol, shots, category, metric, value``;
        ``shots`` is nullable ``Int64`` (NA unless few-shot) and ``value`` is in percent.
    """
    empty = empty_reported().assign(text=pd.Series(dtype=object)) if keep_text else empty_reported()
    if reported_dir is None or not Path(reported_dir).is_dir():
        return empty
    frames = [_read_one(path, keep_text) for path in sorted(Path(reported_dir).glob("*.csv"))]
    frames = [f for f in frames if f is not None and not f.empty]
    if not frames:
        return empty
    return pd.concat(frames, ignore_index=True)


def select_reported(reported: pd.DataFrame, dataset: str, protocol: str, shots: int | None) -> pd.DataFrame:
    """The reported rows of one leaderboard group.

    Parameters
    ----------
    reported : pandas.DataFrame
        A frame from :func:`load_reported`.
    dataset, protocol : str
        The group's dataset and protocol; both must match exactly.
    shots : int or None
        The group's shots; ``None``/NA matches only rows with empty shots, an integer only rows
        with the same number.

    Returns
    -------
    pandas.DataFrame
        The matching rows, in file order.
    """
    keep = (reported["dataset"] == dataset) & (reported["protocol"] == protocol)
    if shots is None or pd.isna(shots):
        keep &= reported["shots"].isna()
    else:
        keep &= reported["shots"].eq(int(shots)).fillna(False)
    return reported[keep.astype(bool)]


def default_reported_dir() -> Path | None:
    """``results/reported`` of the current folder, else of the source checkout; ``None`` if neither has one."""
    for candidate in (Path.cwd() / "results" / "reported", Path(__file__).resolve().parents[2] / "results" / "reported"):
        if candidate.is_dir():
            return candidate
    return None
