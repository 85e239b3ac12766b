"""Miniature copies of the real benchmark trees, file for file, for the dataset plugin tests.

Each builder writes a few small images per category with the names, extensions, nesting and
mask encodings of the real archive (MVTec AD's ``_mask`` PNGs and greyscale categories, VisA's
``.JPG`` images, class-index masks and CRLF split CSV, DAGM's ``Labels.txt``, MVTec 3D-AD's
``rgb/xyz/gt`` folders with defect ids 253/254, BMAD's colour-mapped RGBA labels). Files are
written in shuffled order so that a loader relying on creation or sort order of two separate
listings would pair the wrong files.

Every mask's defect square sits at a position derived from its image's relative path
(:func:`expected_mask`), so a test can check that a sample got *its* mask.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def expected_mask(tag: str, size: int = SIZE) -> np.ndarray:
    """The defect square written for the image identified by ``tag`` (its key), as bool (H, W)."""
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    y, x = (int(v) for v in rng.integers(0, size - 8, 2))
    h, w = (int(v) for v in rng.integers(3, 8, 2))
    mask = np.zeros((size, size), dtype=bool)
    mask[y:y + h, x:x + w] = True
    return mask


def _image(tag: str, mode: str = "RGB", size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(zlib.crc32(tag.encode()) + 1)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L")
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")


class Writer:
    """Collects files to write, then writes them in a shuffled order."""

    def __init__(self, seed: int = 0) -> None:
        self.jobs: list[tuple[Path, object]] = []
        self.seed = seed

    def image(self, path: Path, tag: str, mode: str = "RGB", size: int = SIZE) -> None:
        """Queue a noise image (PNG or JPEG by suffix)."""
        self.jobs.append((path, lambda p, t=tag, m=mode, s=size: _save(_image(t, m, s), p)))

    def mask(self, path: Path, tag: str, value: int = 255, encoding: str = "L", size: int = SIZE) -> None:
        """Queue a mask whose defect square follows :func:`expected_mask` (``tag``).

        ``encoding``: ``"L"`` (one channel holding ``value``), ``"RGBA"`` (colour-mapped, alpha
        255 everywhere, as BMAD's labels), ``"classes"`` (VisA: class indices 1 and 2).
        """
        def write(p, t=tag, v=value, e=encoding, s=size):
            m = expected_mask(t, s)
            if e == "RGBA":
                arr = np.zeros((s, s, 4), dtype=np.uint8)
                arr[..., 3] = 255
                arr[m] = (200, 30, 0, 255)
                img = Image.fromarray(arr, "RGBA")
            elif e == "classes":
                arr = np.zeros((s, s), dtype=np.uint8)
                arr[m] = 1
                ys, xs = np.nonzero(m)
                arr[ys[0], xs[0]] = 2  # a second defect class in the same mask
                img = Image.fromarray(arr, "L")
            else:
                img = Image.fromarray(m.astype(np.uint8) * v, "L")
            _save(img, p)
        self.jobs.append((path, write))

    def text(self, path: Path, content: str | bytes) -> None:
        """Queue a text (or raw bytes) file."""
        data = content.encode() if isinstance(content, str) else content
        self.jobs.append((path, lambda p, d=data: p.write_bytes(d)))

    def write(self) -> None:
        """Write every queued file, in a shuffled order."""
        random.Random(self.seed).shuffle(self.jobs)
        for path, job in self.jobs:
            path.parent.mkdir(parents=True, exist_ok=True)
            job(path)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=90)
    elif path.suffix.lower() in (".tif", ".tiff"):
        img.save(path, format="TIFF")
    else:
        img.save(path, format="PNG")


# -- MVTec AD and MPDD -----------------------------------------------------------------------
#: category -> (n train, n test good, {defect: n})
MVTEC_PLAN = {"bottle": (3, 2, {"broken_large": 2, "contamination": 3}),
              "grid": (4, 1, {"bent": 2})}
MPDD_PLAN = {"bracket_black": (3, 2, {"hole": 2, "scratches": 1}), "tubes": (2, 1, {"anomalous": 3})}
GREYSCALE = {"grid", "screw", "zipper"}


def build_mvtec_like(root: Path, plan: dict, mask_suffix: str = "_mask", image_ext: str = ".png",
                     extras: bool = True) -> Path:
    """Write an MVTec AD style tree (MVTec AD itself, MPDD, VisA prepared, converted DAGM)."""
    w = Writer()
    for cat, (n_train, n_good, defects) in plan.items():
        mode = "L" if cat in GREYSCALE else "RGB"
        for i in range(n_train):
            w.image(root / cat / "train" / "good" / f"{i:03d}{image_ext}", f"{cat}/train/good/{i:03d}", mode)
        for i in range(n_good):
            w.image(root / cat / "test" / "good" / f"{i:03d}{image_ext}", f"{cat}/test/good/{i:03d}", mode)
        for defect, n in defects.items():
            for i in range(n):  # numbering restarts in every defect folder, as in the archive
                tag = f"{cat}/test/{defect}/{i:03d}"
                w.image(root / cat / "test" / defect / f"{i:03d}{image_ext}", tag, mode)
                w.mask(root / cat / "ground_truth" / defect / f"{i:03d}{mask_suffix}.png", tag)
    if extras:
        w.text(root / "license.txt", "CC BY-NC-SA 4.0\n")
        w.text(root / "readme.txt", "miniature\n")
    w.write()
    return root


def build_mvtec(root: Path) -> Path:
    """MVTec AD in miniature: ``bottle`` (RGB) and ``grid`` (greyscale)."""
    return build_mvtec_like(root, MVTEC_PLAN)


def build_mpdd(root: Path) -> Path:
    """MPDD in miniature (MVTec layout)."""
    return build_mvtec_like(root, MPDD_PLAN, extras=False)


# -- VisA ------------------------------------------------------------------------------------
#: category -> (n train normal, n test normal, n test anomalous)
VISA_PLAN = {"candle": (3, 2, 2), "pcb1": (2, 1, 3)}


def build_visa_raw(root: Path) -> Path:
    """VisA as the archive extracts: Data/Images/{Normal,Anomaly}/*.JPG, class-index masks, CRLF CSV."""
    w = Writer(seed=1)
    rows = ["object,split,label,image,mask"]
    for cat, (n_train, n_test_normal, n_anom) in VISA_PLAN.items():
        for i in range(n_train + n_test_normal):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            split = "train" if i < n_train else "test"
            w.image(root / rel, f"{cat}/{split}/good/{i:04d}")
            rows.append(f"{cat},{split},normal,{rel},")
        for i in range(n_anom):
            rel, mrel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            tag = f"{cat}/test/bad/{i:03d}"
            w.image(root / rel, tag)
            w.mask(root / mrel, tag, encoding="classes")
            rows.append(f"{cat},test,anomaly,{rel},{mrel}")
        w.text(root / cat / "image_anno.csv", "image,label,mask\r\n")  # ships with the archive
    # The archive's split files use Windows line endings.
    w.text(root / "split_csv" / "1cls.csv", "\r\n".join(rows) + "\r\n")
    w.text(root / "split_csv" / "2cls_fewshot.csv", "object,split,label,image,mask\r\n")
    w.text(root / "LICENSE-DATASET", "CC BY 4.0\n")
    w.write()
    return root


def build_visa_prepared(root: Path) -> Path:
    """VisA after its preparation script (1cls): train/good, test/{good,bad}, ground_truth/bad/<stem>.png."""
    plan = {c: (a, b, {"bad": d}) for c, (a, b, d) in VISA_PLAN.items()}
    return build_mvtec_like(root, plan, mask_suffix="", image_ext=".JPG", extras=False)


# -- DAGM 2007 -------------------------------------------------------------------------------
#: class -> {split folder: (n non-defective, n defective)}
DAGM_PLAN = {"Class1": {"Train": (3, 2), "Test": (2, 2)}, "Class7": {"Train": (2, 1), "Test": (1, 3)}}


def build_dagm_raw(root: Path) -> Path:
    """DAGM 2007 as distributed: greyscale .PNG, Label/Labels.txt, Label/<stem>_label.PNG."""
    w = Writer(seed=2)
    number = 0
    for cat, splits in DAGM_PLAN.items():
        for folder, (n_ok, n_def) in splits.items():
            split = "train" if folder == "Train" else "test"
            lines = ["1"]
            for j in range(n_ok + n_def):
                number += 1
                stem, defective = f"{number:04d}", j >= n_ok
                tag = f"{cat}/{split}/{'bad' if defective else 'good'}/{stem}"
                w.image(root / cat / folder / f"{stem}.PNG", tag, mode="L")
                if defective:
                    w.mask(root / cat / folder / "Label" / f"{stem}_label.PNG", tag)
                    lines.append(f"{j + 1}\t1\t{stem}.PNG\t0\t{stem}_label.PNG")
                else:
                    lines.append(f"{j + 1}\t0\t{stem}.PNG\t0\t0")
            w.text(root / cat / folder / "Label" / "Labels.txt", "\n".join(lines) + "\n")
    w.write()
    return root


def build_dagm_mvtec(root: Path) -> Path:
    """DAGM converted to the MVTec layout (train/good, test/{good,bad}, ground_truth/bad/<stem>_mask.png)."""
    plan = {c: (s["Train"][0], s["Test"][0], {"bad": s["Test"][1]}) for c, s in DAGM_PLAN.items()}
    return build_mvtec_like(root, plan, extras=False)


# -- MVTec 3D-AD -----------------------------------------------------------------------------
#: category -> (n train, n validation, n test good, {defect: n})
MVTEC3D_PLAN = {"bagel": (3, 2, 2, {"crack": 2, "contamination": 1}), "foam": (2, 1, 1, {"cut": 2})}


def _xyz(path: Path) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.zeros((SIZE, SIZE, 3), dtype=np.float32), photometric="rgb")


def build_mvtec3d(root: Path) -> Path:
    """MVTec 3D-AD: {train,validation,test}/<label>/{rgb,xyz,gt}, gt with defect ids 253/254."""
    w = Writer(seed=3)
    for cat, (n_train, n_val, n_good, defects) in MVTEC3D_PLAN.items():
        folders = [("train", "good", n_train), ("validation", "good", n_val), ("test", "good", n_good),
                   *(("test", d, n) for d, n in defects.items())]
        for split, label, n in folders:
            base = root / cat / split / label
            for i in range(n):
                tag = f"{cat}/{split}/{label}/{i:03d}"
                w.image(base / "rgb" / f"{i:03d}.png", tag)
                w.jobs.append((base / "xyz" / f"{i:03d}.tiff", lambda p: _xyz(p)))
                if split == "test":
                    # Normal test samples have all-zero gt masks; defects use ids, not 255.
                    value = 0 if label == "good" else (253 if i % 2 == 0 else 254)
                    w.mask(base / "gt" / f"{i:03d}.png", tag, value=value)
        w.text(root / cat / "calibration" / "camera_parameters.json", "{}\n")
    w.text(root / "license.txt", "CC BY-NC-SA 4.0\n")
    w.text(root / "readme.txt", "miniature\n")
    w.write()
    return root


# -- BMAD ------------------------------------------------------------------------------------
#: (n train, n test good, n test Ungood)
BMAD_PLAN = {"Brain": (3, 2, 2), "Liver": (2, 2, 3), "RESC": (2, 1, 2)}


def build_bmad_set(root: Path, name: str, nesting: str, flat_train: bool = False) -> Path:
    """One BMAD set; ``nesting`` is ``"label_first"`` ({good,Ungood}/{img,label}) or ``"kind_first"``.

    ``name`` is both the folder name and the key of :data:`BMAD_PLAN`; masks are RGBA colour maps.
    """
    w = Writer(seed=4)
    n_train, n_good, n_bad = BMAD_PLAN[name]
    folder = root / name
    category = {"Brain": "brainmri", "Liver": "liverct", "RESC": "resc"}[name]
    train_dir = folder / "train" / "good" if flat_train else folder / "train" / "good" / "img"
    for i in range(n_train):
        w.image(train_dir / f"{i:05d}_60.png", f"{category}/train/good/{i:05d}_60", mode="L")

    def place(split: str, label: str, kind: str) -> Path:
        return folder / split / label / kind if nesting == "label_first" else folder / split / kind / label

    for split in ("valid", "test"):
        for i in range(n_good):
            stem = f"{100 + i:05d}_70"
            w.image(place(split, "good", "img") / f"{stem}.png", f"{category}/{split}/good/{stem}", mode="L")
            if nesting == "label_first":
                w.mask(place(split, "good", "label") / f"{stem}.png", "none", value=0)
        for i in range(n_bad):
            stem = f"{200 + i:05d}_80"
            tag = f"{category}/{split}/Ungood/{stem}"
            w.image(place(split, "Ungood", "img") / f"{stem}.png", tag, mode="L")
            w.mask(place(split, "Ungood", "label") / f"{stem}.png", tag, encoding="RGBA")
    w.write()
    return folder


def build_bmad(root: Path) -> Path:
    """The three BMAD sets with masks under one root, each with its own nesting."""
    build_bmad_set(root, "Brain", "label_first")
    build_bmad_set(root, "Liver", "kind_first")
    build_bmad_set(root, "RESC", "kind_first", flat_train=True)
    return root


# -- Folder ----------------------------------------------------------------------------------
def build_folder(root: Path) -> Path:
    """A user's tree: ``widgets`` with masks (``_mask``), ``gadgets`` without a ground_truth folder."""
    build_mvtec_like(root, {"widgets": (3, 2, {"dent": 2})}, extras=False)
    w = Writer(seed=5)
    for i in range(2):
        w.image(root / "gadgets" / "train" / "good" / f"img{i}.jpg", f"gadgets/train/good/img{i}")
        w.image(root / "gadgets" / "test" / "good" / f"ok{i}.jpg", f"gadgets/test/good/ok{i}")
        w.image(root / "gadgets" / "test" / "scratch" / f"s{i}.jpg", f"gadgets/test/scratch/s{i}")
    w.write()
    return root
