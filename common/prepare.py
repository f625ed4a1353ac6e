"""Turn each dataset's official download into this project's on-disk formats.

    python -m common.prepare --list
    python -m common.prepare isic --src ~/downloads/isic2018            # -> data/isic/
    python -m common.prepare mimic-cxr --src /big/mimic-cxr-jpg --out /fast/mimic

You download a dataset from its official source and unpack it anywhere. One command then reads the official
layout (and only what it needs), checks it, and writes data/NAME/ in the formats common/data.py and
common/ct.py read: a split JSON for classification, image-report CSVs, CheXpert-style multi-label CSVs, or
CT volumes plus CSVs. A prepare.json records the source, the seed, the counts per split and class, and the
paper's counts next to ours. See data/README.md for every dataset's source, access terms and raw layout.

How images are referenced. Every converter writes paths relative to data/NAME. Files that are used as they
are (JPEG/PNG/NIfTI) are reached through data/NAME/raw, a symlink to the --src folder, so a split file says
"raw/ISIC2018_Task3_Training_Input/ISIC_0024306.jpg" and stays valid whatever machine or folder the raw data
sits in: move the raw data, re-point one symlink. With --copy (or --max-side N) data/NAME/raw is a real folder
holding copies (or copies resized so the longer side is at most N) under the same relative paths, so the
split files do not change. Files that must be converted (DermaMNIST arrays, RSNA DICOMs) go to
data/NAME/images/.

Guarantees, because a half-written dataset is worse than none:
- the source is never modified;
- everything is written into a hidden sibling folder and renamed into place at the end, so an interrupted run
  leaves data/NAME untouched (and the next run deletes the leftover);
- an existing data/NAME with a prepare.json is left alone (idempotent); --force rebuilds it;
- a wrong --src raises DataError naming the files that were expected; `main` prints it and exits with 2.
"""
import argparse
import csv
import datetime
import gzip
import io
import json
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import CHEXPERT_FINDINGS, DataError

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"  # the project version recorded in every prepare.json
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# ----------------------------------------------------------------------------------------------------------
# The papers' numbers, printed next to ours. Classification counts are CILMP's dataset table (train / test);
# "per_class" lists are in the label order of CLASSNAMES below. None = the paper gives no number.

PAPER_COUNTS = {
    "adam": {"train": 400, "test": 400},
    "aptos2019": {"train": 2930, "test": 732},
    "chaoyang": {"train": 4021, "test": 2139,
                 # the dataset's own README (per class, normal / serrated / adenocarcinoma / adenoma)
                 "per_class": {"train": [1111, 842, 1404, 664], "test": [705, 321, 840, 273]}},
    "cpn-x-ray": {"train": 3659, "test": 1569},
    "dermamnist": {"train": 5600, "test": 2400},  # see data/README.md: the official split is 7007/1003/2005
    "derm7pt": {"train": 413, "test": 395},
    "fetal-us": {"train": 7129, "test": 5271},
    "isic": {"train": 10015, "test": 1512},
    "kvasir": {"train": 5600, "test": 2400},
    "odir": {"train": 5113, "test": 1279},
    "pneumonia": {"train": 5216, "test": 624},
    # chest X-ray / CT: what the papers (and GLoRIA's CheXpert-5x200 recipe) fix
    "chexpert": {"chexpert_5x200": 1000},
    "rsna": {},
    "mimic-cxr": {},
    "ct-rate": {"train": None, "valid": None},
}

# Class names exactly as the official CILMP loaders (and so the LLM-feature file names) spell them, in label
# order. The split JSON carries them; common.data.classnames_from_split reads them back.
CLASSNAMES = {
    "isic": ["Melanoma", "Melanocytic nevus", "Basal cell carcinoma", "Actinic keratosis", "Benign keratosis",
             "Dermatofibroma", "Vascular lesion"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "derm7pt": ["carcinoma", "keratosis", "melanoma", "miscellaneous", "nevus"],
    "aptos2019": ["no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                  "severe diabetic retinopathy", "proliferative diabetic retinopathy"],
    "kvasir": ["dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum", "normal pylorus",
               "normal z-line", "polyps", "ulcerative colitis"],
    "pneumonia": ["normal", "bacteria pneumonia", "virus pneumonia"],
    "pneumonia2": ["normal", "pneumonia"],
    "cpn-x-ray": ["normal", "covid", "pneumonia"],
    "chaoyang": ["normal", "serrated", "adenocarcinoma", "adenoma"],
    "fetal-us": ["Fetal brain", "Fetal femur", "Fetal abdomen", "Fetal thorax", "Maternal cervix",
                 "Other planes"],
    "adam": ["normal fundus", "fundus with age-related macular degeneration"],
    "odir": ["normal", "diabetes", "glaucoma", "cataract", "age related macular degeneration", "hypertension",
             "pathological myopia", "other diseases or abnormalities"],
    "rsna": ["normal", "pneumonia"],
    "chexpert5x200": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"],
}

# Derm7pt's 20 diagnoses grouped into the 5 classes CILMP uses: the grouping of the derm7pt package's
# Derm7PtDatasetGroupInfrequent (BCC, SK, MEL, NEV, MISC).
DERM7PT_MAP = {
    "basal cell carcinoma": "carcinoma",
    "seborrheic keratosis": "keratosis",
    "melanoma": "melanoma", "melanoma (in situ)": "melanoma", "melanoma (less than 0.76 mm)": "melanoma",
    "melanoma (0.76 to 1.5 mm)": "melanoma", "melanoma (more than 1.5 mm)": "melanoma",
    "melanoma metastasis": "melanoma",
    "blue nevus": "nevus", "clark nevus": "nevus", "combined nevus": "nevus", "congenital nevus": "nevus",
    "dermal nevus": "nevus", "recurrent nevus": "nevus", "reed or spitz nevus": "nevus",
    "dermatofibroma": "miscellaneous", "lentigo": "miscellaneous", "melanosis": "miscellaneous",
    "miscellaneous": "miscellaneous", "vascular lesion": "miscellaneous",
}

# ----------------------------------------------------------------------------------------------------------
# reading the source


def find_dir(src, candidates, dataset, expected, marker=None):
    """First src/<candidate> folder (holding `marker`, when given); DataError naming what was expected otherwise.

    The candidates cover the usual ways an archive unpacks (with or without its top folder)."""
    for c in candidates:
        p = src / c if c else src
        if p.is_dir() and (marker is None or (p / marker).exists()):
            return p
    raise DataError(f"{dataset}: {src} does not look like the official download: expected {expected}. "
                    f"Point --src at the folder you unpacked it into (see data/README.md).")


def find_file(src, candidates, dataset, expected):
    """First of src/<candidate> that is a file (a candidate may be a glob); DataError otherwise."""
    for c in candidates:
        hits = sorted(src.glob(c)) if any(ch in c for ch in "*?[") else [src / c]
        for p in hits:
            if p.is_file():
                return p
    raise DataError(f"{dataset}: {src} does not look like the official download: expected {expected}. "
                    f"Point --src at the folder you unpacked it into (see data/README.md).")


def read_csv(path, required=(), delimiter=None):
    """Rows of a CSV (or .csv.gz) as dicts with stripped header names; DataError on missing columns."""
    path = Path(path)
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    text = raw.decode("utf-8-sig", errors="replace")
    if delimiter is None:  # FETAL_PLANES_DB is ';'-separated; sniff from the header line only
        header = text.split("\n", 1)[0]
        delimiter = ";" if header.count(";") > header.count(",") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {header}")
    rows = []
    for values in reader:
        if not values or all(not v.strip() for v in values):
            continue
        rows.append({h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)})
    return rows


def number(value, where, kind=float):
    """kind(value), or DataError naming where the bad cell is (no bare ValueError from deep inside)."""
    try:
        return kind(value)
    except ValueError:
        raise DataError(f"{where}: expected a number, got {value!r}") from None


def check_exists(paths, dataset, limit=5):
    """DataError listing (the first few) missing files: a partial download should fail before any writing."""
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{dataset}: {len(missing)} image file(s) named by the labels are missing, e.g. "
                        f"{missing[:limit]}; is the download complete?")


def list_images(folder):
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------
# splitting


def allocate(counts, n_take):
    """Split n_take over classes in proportion to counts, largest remainder first (sums exactly to n_take)."""
    total = sum(counts)
    exact = [c * n_take / total for c in counts]
    take = [int(x) for x in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - take[i]), i))
    for i in order[: n_take - sum(take)]:
        take[i] += 1
    return take


def stratified_split(labels, n_test, seed):
    """Seeded stratified split -> (train_idx, test_idx), each sorted; exactly n_test go to test.

    Per class, the members are permuted with numpy's PCG64 seeded by `seed` and the first k taken, k from
    `allocate`, so the same source and seed always give the same split on every machine.
    """
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    members = [np.flatnonzero(labels == c) for c in classes]
    take = allocate([len(m) for m in members], n_test)
    rng = np.random.default_rng(seed)
    test = []
    for m, k in zip(members, take):
        test.extend(m[rng.permutation(len(m))[:k]].tolist())
    test_set = set(test)
    train = [i for i in range(len(labels)) if i not in test_set]
    return train, sorted(test)


def paper_test_size(name, n_total, fallback_frac):
    """How many go to test: the paper's test fraction applied to our total (the paper's count if equal)."""
    p = PAPER_COUNTS.get(name, {})
    if p.get("train") and p.get("test"):
        return round(n_total * p["test"] / (p["train"] + p["test"]))
    return round(n_total * fallback_frac)


# ----------------------------------------------------------------------------------------------------------
# writing: atomic output folder, image placement, split JSON, prepare.json


class Output:
    """The output folder being written. Everything goes to a hidden sibling, renamed into place on success.

    with Output(out, src, copy, max_side) as o:
        rel = o.place(src_file)          # "raw/<path inside src>" (symlinked source, or a copy)
        o.write_json("split_x.json", obj)
    """

    def __init__(self, out, src, copy=False, max_side=None, link_raw=True):
        # abspath, not resolve(): symlinks inside the download stay as they are (and it is cheap per image)
        self.out, self.src = Path(out), Path(os.path.abspath(src))
        self.copy, self.max_side = copy or bool(max_side), max_side
        self.link_raw = link_raw
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.files = []

    def __enter__(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for pattern in (f".{self.out.name}.partial-*", f".{self.out.name}.old-*"):  # left by a killed run
            for old in self.out.parent.glob(pattern):
                shutil.rmtree(old, ignore_errors=True)
        self.tmp.mkdir()
        if self.link_raw and not self.copy:
            os.symlink(self.src, self.tmp / "raw", target_is_directory=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # includes KeyboardInterrupt: never leave a half-written dataset
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists() or self.out.is_symlink():
            os.rename(self.out, trash)
        os.rename(self.tmp, self.out)
        shutil.rmtree(trash, ignore_errors=True)
        return False

    def place(self, path):
        """Reference a source file from data/NAME; copies (and shrinks) it with --copy / --max-side."""
        path = Path(path)
        rel = Path(os.path.relpath(os.path.abspath(path), self.src))
        if rel.parts and rel.parts[0] == "..":
            raise DataError(f"{path} is outside the source folder {self.src}")
        if self.copy:
            dst = self.tmp / "raw" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if self.max_side and path.suffix.lower() in IMAGE_EXTS:
                save_resized(path, dst, self.max_side)
            else:
                shutil.copyfile(path, dst)
        return "raw/" + rel.as_posix()

    def save_image(self, relpath, array_or_image):
        """Write a converted image (uint8 array or PIL image) to data/NAME/<relpath>, shrunk to --max-side."""
        img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
        if self.max_side and max(img.size) > self.max_side:
            img = shrink(img, self.max_side)
        dst = self.tmp / relpath
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst)
        return relpath

    def write_json(self, name, obj):
        with open(self.tmp / name, "w") as f:
            json.dump(obj, f, indent=1)
        self.files.append(name)

    def write_csv(self, name, header, rows):
        with open(self.tmp / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        self.files.append(name)


def shrink(img, max_side):
    """Resize so the longer side is max_side (bicubic, aspect kept)."""
    w, h = img.size
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)


def save_resized(src, dst, max_side):
    """Copy an image, shrinking it when its longer side exceeds max_side (never enlarging)."""
    try:
        with Image.open(src) as img:
            if max(img.size) <= max_side:
                shutil.copyfile(src, dst)
                return
            img.load()
            small = shrink(img, max_side)
    except OSError as e:
        raise DataError(f"{src}: unreadable image ({e})") from None
    small.save(dst, quality=95) if dst.suffix.lower() in (".jpg", ".jpeg") else small.save(dst)


def split_json(name, items, classnames):
    """{"train": [[relpath, label, classname], ...], "val": ..., "test": ...} with checked labels."""
    out = {}
    for split in SPLITS:
        rows = items.get(split, [])
        for rel, label, cname in rows:
            if classnames[label] != cname:
                raise AssertionError(f"{name}: label {label} is {classnames[label]!r}, item says {cname!r}")
        out[split] = [[rel, int(label), cname] for rel, label, cname in rows]
    return out


def class_counts(split, classnames):
    """{split: {classname: n}} for a split dict, every class listed (0 when absent)."""
    return {s: {c: sum(1 for _, _, cn in rows if cn == c) for c in classnames} for s, rows in split.items()}


def write_classification(o, name, items, classnames, split_name=None, notes=()):
    """Write split_<name>.json and return the summary dict `finish` records."""
    split = split_json(name, items, classnames)
    if not split["train"] or not split["test"]:
        raise DataError(f"{name}: empty split (train {len(split['train'])}, test {len(split['test'])}); "
                        f"is the source complete?")
    o.write_json(f"split_{split_name or name}.json", split)
    return {"counts": class_counts(split, classnames), "classnames": classnames, "notes": list(notes)}


# ----------------------------------------------------------------------------------------------------------
# classification converters (cilmp.py). Each returns a summary: counts per split and class, plus notes.


def prepare_isic(src, out, *, seed=0, copy=False, max_side=None):
    """ISIC 2018 Task 3: official training images + one-hot CSV; official test set as test (validation as val)."""
    name, names = "isic", CLASSNAMES["isic"]
    cols = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]  # same order as the class names

    def read_part(part, required=True):
        folder = src / f"ISIC2018_Task3_{part}_Input"
        gt = [src / f"ISIC2018_Task3_{part}_GroundTruth" / f"ISIC2018_Task3_{part}_GroundTruth.csv",
              src / f"ISIC2018_Task3_{part}_GroundTruth.csv"]
        gt = next((g for g in gt if g.is_file()), None)
        if not folder.is_dir() or gt is None:
            if not required:
                return []
            raise DataError(f"isic: {src} does not look like the ISIC 2018 Task 3 download: expected "
                            f"ISIC2018_Task3_{part}_Input/ and ISIC2018_Task3_{part}_GroundTruth/"
                            f"ISIC2018_Task3_{part}_GroundTruth.csv")
        rows = read_csv(gt, ["image"] + cols)
        out_rows = []
        for r in rows:
            onehot = [number(r[c], f"{gt}, image {r['image']}, column {c}") for c in cols]
            if sorted(onehot) != [0.0] * 6 + [1.0]:
                raise DataError(f"{gt}: image {r['image']} is not one-hot over {cols}: {onehot}")
            out_rows.append((folder / f"{r['image']}.jpg", onehot.index(1.0)))
        check_exists([p for p, _ in out_rows], name)
        return out_rows

    parts = {"train": read_part("Training"), "val": read_part("Validation", required=False),
             "test": read_part("Test")}
    with Output(out, src, copy, max_side) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in rows] for s, rows in parts.items()}
        summary = write_classification(o, name, items, names, notes=[
            "train = official training set, val = official validation set (when present), test = official test"])
        finish(o, name, src, seed, copy, max_side, summary)
    return summary


def _medmnist_npz(src, flag):
    """The MedMNIST npz for `flag` (any size variant), whether --src is the file or its folder.

    With several sizes in one folder the first by name (the 28x28 one) wins: pass the file you want as --src."""
    if src.is_file():
        return src
    hits = sorted(src.glob(f"{flag}*.npz"))
    if not hits:
        raise DataError(f"{flag}: expected {flag}.npz (or {flag}_64/_128/_224.npz) in {src}")
    return hits[0]


def prepare_dermamnist(src, out, *, seed=0, copy=False, max_side=None):
    """DermaMNIST npz (train/val/test arrays, official MedMNIST split) -> PNG files + split JSON."""
    name, names = "dermamnist", CLASSNAMES["dermamnist"]
    path = _medmnist_npz(src, name)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable npz ({e})") from None
    keys = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
    missing = [k for k in keys if k not in data.files]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}; found {data.files}")
    with Output(out, path.parent, copy=True, max_side=max_side) as o:  # PNGs are always written
        items = {}
        for s in ("train", "val", "test"):
            x, y = data[f"{s}_images"], data[f"{s}_labels"].reshape(-1).astype(np.int64)
            if x.dtype != np.uint8 or len(x) != len(y):
                raise DataError(f"{path}: {s}_images must be uint8 with one label per image "
                                f"(got {x.dtype}, {len(x)} images, {len(y)} labels)")
            if y.size and (y.min() < 0 or y.max() >= len(names)):
                raise DataError(f"{path}: {s}_labels outside 0..{len(names) - 1}")
            items[s] = [(o.save_image(f"images/{s}/{i:05d}.png", x[i]), int(y[i]), names[y[i]])
                        for i in range(len(x))]
        summary = write_classification(o, name, items, names, notes=[
            f"official MedMNIST split from {path.name}; the paper's table says 5600/2400"])
        finish(o, name, path, seed, copy, max_side, summary)
    return summary


def prepare_derm7pt(src, out, *, seed=0, copy=False, max_side=None):
    """Derm7pt release_v0: meta/meta.csv + meta/{train,valid,test}_indexes.csv; dermoscopic image per case."""
    name, names = "derm7pt", CLASSNAMES["derm7pt"]
    root = find_dir(src, ["", "release_v0"], name, "meta/meta.csv and images/", marker="meta")
    meta = root / "meta" / "meta.csv"
    if not meta.is_file() or not (root / "images").is_dir():
        raise DataError(f"derm7pt: expected meta/meta.csv, meta/train_indexes.csv and images/ under {root}")
    rows = read_csv(meta, ["diagnosis", "derm"])
    items_raw = {}
    for split, fname in (("train", "train_indexes.csv"), ("val", "valid_indexes.csv"), ("test", "test_indexes.csv")):
        idx = [number(r["indexes"], root / "meta" / fname, int) for r in read_csv(root / "meta" / fname, ["indexes"])]
        bad = [i for i in idx if not 0 <= i < len(rows)]
        if bad:
            raise DataError(f"{root / 'meta' / fname}: indexes {bad[:5]} outside meta.csv's {len(rows)} rows")
        items_raw[split] = []
        for i in idx:
            diag = rows[i]["diagnosis"].strip()
            if diag not in DERM7PT_MAP:
                raise DataError(f"{meta}: row {i} has unknown diagnosis {diag!r}")
            cname = DERM7PT_MAP[diag]
            items_raw[split].append((root / "images" / rows[i]["derm"], names.index(cname)))
    check_exists([p for rows_ in items_raw.values() for p, _ in rows_], name)
    with Output(out, root, copy, max_side) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in r] for s, r in items_raw.items()}
        summary = write_classification(o, name, items, names, notes=[
            "official train/valid/test index files; 20 diagnoses -> 5 classes by DERM7PT_MAP (derm7pt's grouping)"])
        finish(o, name, root, seed, copy, max_side, summary)
    return summary


def prepare_aptos2019(src, out, *, seed=0, copy=False, max_side=None):
    """APTOS 2019 (Kaggle): train.csv (id_code, diagnosis 0-4) + train_images/; seeded stratified 80/20."""
    name, names = "aptos2019", CLASSNAMES["aptos2019"]
    csv_path = find_file(src, ["train.csv"], name, "train.csv and train_images/")
    img_dir = find_dir(src, ["train_images"], name, "train.csv and train_images/")
    rows = read_csv(csv_path, ["id_code", "diagnosis"])
    paths, labels = [], []
    for r in rows:
        y = number(r["diagnosis"], f"{csv_path}, id_code {r['id_code']}", int)
        if not 0 <= y < len(names):
            raise DataError(f"{csv_path}: diagnosis {y} for {r['id_code']} outside 0..4")
        paths.append(img_dir / f"{r['id_code']}.png")
        labels.append(y)
    check_exists(paths, name)
    return _write_seeded(name, src, out, paths, labels, names, seed, copy, max_side,
                         "the test set has no public labels: seeded stratified split of train.csv, paper's 80/20")


def _write_seeded(name, src, out, paths, labels, names, seed, copy, max_side, note, paper_key=None,
                  fallback_frac=0.3):
    """Seeded stratified train/test split of one labelled pool (val = [] : the CILMP protocol has none).

    The test size is the paper's test fraction (PAPER_COUNTS[paper_key or name]) of our total, else
    fallback_frac."""
    n_test = paper_test_size(paper_key or name, len(paths), fallback_frac)
    tr, te = stratified_split(labels, n_test, seed)
    with Output(out, src, copy, max_side) as o:
        items = {"train": [(o.place(paths[i]), labels[i], names[labels[i]]) for i in tr],
                 "val": [],
                 "test": [(o.place(paths[i]), labels[i], names[labels[i]]) for i in te]}
        summary = write_classification(o, name, items, names, notes=[note + f" (seed {seed})"])
        finish(o, name, src, seed, copy, max_side, summary)
    return summary


def _class_folders(root, folder_to_class, dataset):
    """(paths, labels) from class sub-folders; DataError naming the expected folders when any is missing."""
    paths, labels = [], []
    for folder, label in folder_to_class.items():
        d = root / folder
        if not d.is_dir():
            raise DataError(f"{dataset}: expected class folders {sorted(folder_to_class)} in {root}; "
                            f"{folder}/ is missing")
        files = list_images(d)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def prepare_kvasir(src, out, *, seed=0, copy=False, max_side=None):
    """Kvasir v2: 8 class folders of 1000 JPEGs; seeded stratified 70/30 (5600/2400)."""
    name, names = "kvasir", CLASSNAMES["kvasir"]
    root = find_dir(src, ["kvasir-dataset-v2", ""], name, "kvasir-dataset-v2/<8 class folders>",
                    marker="polyps")
    folders = {c.replace(" ", "-"): i for i, c in enumerate(names)}
    paths, labels = _class_folders(root, folders, name)
    return _write_seeded(name, root, out, paths, labels, names, seed, copy, max_side,
                         "no official split: seeded stratified split, paper's 70/30")


def _kermany_root(src):
    """The chest_xray folder holding train/ and test/ (Kaggle's zip nests chest_xray/chest_xray)."""
    for c in ["", "chest_xray", "chest_xray/chest_xray", "ChestXRay2017/chest_xray"]:
        p = src / c if c else src
        if (p / "train" / "NORMAL").is_dir() and (p / "test" / "PNEUMONIA").is_dir():
            return p
    raise DataError(f"pneumonia: expected chest_xray/{{train,test,val}}/{{NORMAL,PNEUMONIA}}/ under {src}")


def prepare_pneumonia(src, out, *, seed=0, copy=False, max_side=None):
    """Kermany chest_xray: official train/val/test folders; bacteria vs virus from the file names."""
    root = _kermany_root(src)
    names3, names2 = CLASSNAMES["pneumonia"], CLASSNAMES["pneumonia2"]
    raw = {}
    for split, folder in (("train", "train"), ("val", "val"), ("test", "test")):
        raw[split] = []
        if not (root / folder).is_dir():
            continue
        for f in list_images(root / folder / "NORMAL") if (root / folder / "NORMAL").is_dir() else []:
            raw[split].append((f, 0, 0))
        for f in list_images(root / folder / "PNEUMONIA") if (root / folder / "PNEUMONIA").is_dir() else []:
            # file names are person<N>_bacteria_<M>.jpeg / person<N>_virus_<M>.jpeg
            kind = "bacteria" if "bacteria" in f.name.lower() else "virus" if "virus" in f.name.lower() else None
            if kind is None:
                raise DataError(f"pneumonia: {f} is neither *bacteria* nor *virus*; cannot make the 3-class split")
            raw[split].append((f, 1 if kind == "bacteria" else 2, 1))
    with Output(out, root, copy, max_side) as o:
        rel = {s: [(o.place(f), y3, y2) for f, y3, y2 in rows] for s, rows in raw.items()}
        items3 = {s: [(r, y3, names3[y3]) for r, y3, _ in rows] for s, rows in rel.items()}
        items2 = {s: [(r, y2, names2[y2]) for r, _, y2 in rows] for s, rows in rel.items()}
        summary = write_classification(o, "pneumonia", items3, names3, notes=[
            "official train/val/test folders; split_pneumonia2.json holds the 2-class (normal/pneumonia) version"])
        write_classification(o, "pneumonia2", items2, names2)
        finish(o, "pneumonia", root, seed, copy, max_side, summary)
    return summary


def prepare_cpn_x_ray(src, out, *, seed=0, copy=False, max_side=None):
    """COVID/Pneumonia/Normal chest X-rays in three class folders (any case); seeded stratified 70/30."""
    name, names = "cpn-x-ray", CLASSNAMES["cpn-x-ray"]
    found = {}
    for d in sorted(p for p in src.rglob("*") if p.is_dir()):
        key = d.name.lower()
        cls = "covid" if "covid" in key else "normal" if key == "normal" else "pneumonia" if key == "pneumonia" else None
        if cls and list_images(d):
            found.setdefault(cls, []).append(d)
    if sorted(found) != sorted(names):
        raise DataError(f"cpn-x-ray: expected image folders named covid*/, normal/ and pneumonia/ (any case) "
                        f"under {src}; found {sorted(found)}")
    paths, labels = [], []
    for cls, dirs in sorted(found.items()):
        for d in dirs:
            files = list_images(d)
            paths += files
            labels += [names.index(cls)] * len(files)
    return _write_seeded(name, src, out, paths, labels, names, seed, copy, max_side,
                         "no official split: seeded stratified split, paper's 70/30")


def prepare_chaoyang(src, out, *, seed=0, copy=False, max_side=None):
    """Chaoyang: train.json / test.json lists of {"name": relpath, "label": 0-3}; official split."""
    name, names = "chaoyang", CLASSNAMES["chaoyang"]
    root = find_dir(src, ["", "chaoyang-data"], name, "train.json, test.json, train/ and test/",
                    marker="train.json")
    raw = {"val": []}
    for split in ("train", "test"):
        path = root / f"{split}.json"
        if not path.is_file():
            raise DataError(f"chaoyang: expected train.json and test.json in {root}; {path.name} is missing")
        try:
            entries = json.loads(path.read_text())
            raw[split] = [(root / e["name"], int(e["label"])) for e in entries]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: expected a list of {{\"name\": ..., \"label\": ...}} ({e})") from None
        bad = [y for _, y in raw[split] if not 0 <= y < len(names)]
        if bad:
            raise DataError(f"{path}: labels {sorted(set(bad))} outside 0..3")
        check_exists([p for p, _ in raw[split]], name)
    with Output(out, root, copy, max_side) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in rows] for s, rows in raw.items()}
        summary = write_classification(o, name, items, names, notes=["official train.json / test.json"])
        finish(o, name, root, seed, copy, max_side, summary)
    return summary


def prepare_fetal_us(src, out, *, seed=0, copy=False, max_side=None):
    """FETAL_PLANES_DB: FETAL_PLANES_DB_data.csv (';'-separated, Train 1/0) + Images/<Image_name>.png."""
    name, names = "fetal-us", CLASSNAMES["fetal-us"]
    csv_path = find_file(src, ["FETAL_PLANES_DB_data.csv", "*/FETAL_PLANES_DB_data.csv"], name,
                         "FETAL_PLANES_DB_data.csv and Images/")
    img_dir = csv_path.parent / "Images"
    plane_to_class = {"Fetal brain": 0, "Fetal femur": 1, "Fetal abdomen": 2, "Fetal thorax": 3,
                      "Maternal cervix": 4, "Other": 5}
    rows = read_csv(csv_path, ["Image_name", "Plane", "Train"])
    raw = {"train": [], "val": [], "test": []}
    for r in rows:
        if r["Plane"] not in plane_to_class:
            raise DataError(f"{csv_path}: unknown Plane {r['Plane']!r} for {r['Image_name']}")
        if r["Train"] not in ("0", "1"):
            raise DataError(f"{csv_path}: Train must be 1 or 0, got {r['Train']!r} for {r['Image_name']}")
        raw["train" if r["Train"] == "1" else "test"].append((img_dir / f"{r['Image_name']}.png",
                                                              plane_to_class[r["Plane"]]))
    check_exists([p for v in raw.values() for p, _ in v], name)
    with Output(out, csv_path.parent, copy, max_side) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in v] for s, v in raw.items()}
        summary = write_classification(o, name, items, names, notes=[
            "official split from the Train column; Plane 'Other' is the class 'Other planes'"])
        finish(o, name, csv_path.parent, seed, copy, max_side, summary)
    return summary


def prepare_adam(src, out, *, seed=0, copy=False, max_side=None):
    """ADAM (iChallenge-AMD): Training400/{AMD,Non-AMD}/ as train; a labelled 400-image set as test.

    The paper's test set is the 400-image validation set. Put its images in Validation400/{AMD,Non-AMD}/ (the
    labels are released as a separate file; see data/README.md); without it the 400 training images are
    split 50/50 (seeded, stratified) and prepare.json says so.
    """
    name, names = "adam", CLASSNAMES["adam"]
    root = find_dir(src, ["", "ADAM", "AMD", "iChallenge-AMD"], name,
                    "Training400/AMD/ and Training400/Non-AMD/", marker="Training400")
    folders = {"Non-AMD": 0, "AMD": 1}
    if not (root / "Training400").is_dir():
        raise DataError(f"adam: expected Training400/AMD/ and Training400/Non-AMD/ in {root}")
    paths, labels = _class_folders(root / "Training400", folders, name)
    test_root = next((root / d for d in ("Validation400", "Validation-400", "Test400")
                      if (root / d / "AMD").is_dir()), None)
    if test_root is None:
        return _write_seeded(name, root, out, paths, labels, names, seed, copy, max_side,
                             "no labelled validation set found: seeded stratified 50/50 split of Training400",
                             paper_key="adam-no-test-set", fallback_frac=0.5)
    tpaths, tlabels = _class_folders(test_root, folders, name)
    with Output(out, root, copy, max_side) as o:
        items = {"train": [(o.place(p), y, names[y]) for p, y in zip(paths, labels)], "val": [],
                 "test": [(o.place(p), y, names[y]) for p, y in zip(tpaths, tlabels)]}
        summary = write_classification(o, name, items, names,
                                       notes=[f"train = Training400, test = {test_root.name}"])
        finish(o, name, root, seed, copy, max_side, summary)
    return summary


def prepare_odir(src, out, *, seed=0, copy=False, max_side=None):
    """ODIR-5K as on Kaggle: full_df.csv (one row per eye image, 'labels' like "['N']") + preprocessed_images/."""
    name, names = "odir", CLASSNAMES["odir"]
    csv_path = find_file(src, ["full_df.csv", "*/full_df.csv"], name, "full_df.csv and preprocessed_images/")
    img_dir = find_dir(csv_path.parent, ["preprocessed_images", "ODIR-5K/Training Images"], name,
                       "full_df.csv and preprocessed_images/")
    letters = "NDGCAHMO"  # the column order of the ODIR labels = CILMP's class order
    rows = read_csv(csv_path, ["filename", "labels"])
    paths, labels = [], []
    for r in rows:
        m = re.fullmatch(r"\[\s*'([A-Z])'\s*\]", r["labels"])
        if not m or m.group(1) not in letters:
            raise DataError(f"{csv_path}: labels {r['labels']!r} for {r['filename']} is not one of "
                            f"['N'] ['D'] ... ['O']")
        paths.append(img_dir / r["filename"])
        labels.append(letters.index(m.group(1)))
    check_exists(paths, name)
    return _write_seeded(name, csv_path.parent, out, paths, labels, names, seed, copy, max_side,
                         "no labelled official test set: seeded stratified split of full_df.csv, paper's 80/20")


# ----------------------------------------------------------------------------------------------------------
# chest X-ray converters (cleft.py, adaptor.py, alta.py)

CHEXPERT_META = ["Sex", "Age", "Frontal/Lateral", "AP/PA"]
CHEXPERT_5X200_N = 200  # images per class in CheXpert-5x200 (GLoRIA); a name so tests can use a tiny mock


def _chexpert_5x200(rows, seed):
    """GLoRIA's CheXpert-5x200: per competition finding, 200 frontal images where that finding is 1 and every
    other finding except No Finding is 0 (blank counts as 0, uncertain -1 does not). Returns row indices in 5
    blocks of 200 (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion)."""
    others = [f for f in CHEXPERT_FINDINGS if f != "No Finding"]
    value = lambda r, f: float(r[f]) if r[f] not in ("", "nan") else 0.0  # GLoRIA: df.fillna(0)
    rng = np.random.default_rng(seed)
    blocks = []
    for target in CLASSNAMES["chexpert5x200"]:
        pool = [i for i, r in enumerate(rows) if r["Frontal/Lateral"] == "Frontal" and value(r, target) == 1.0
                and all(value(r, f) == 0.0 for f in others if f != target)]
        if len(pool) < CHEXPERT_5X200_N:
            raise DataError(f"chexpert: only {len(pool)} frontal images have {target} as their only finding; "
                            f"CheXpert-5x200 needs {CHEXPERT_5X200_N} (is this the full train.csv?)")
        blocks.append(sorted(np.asarray(pool)[rng.permutation(len(pool))[:CHEXPERT_5X200_N]].tolist()))
    return blocks


def prepare_chexpert(src, out, *, seed=0, copy=False, max_side=None):
    """CheXpert v1.0 (or -small): train.csv / valid.csv -> multi-label CSVs + the CheXpert-5x200 test set."""
    name = "chexpert"
    root = find_dir(src, ["", "CheXpert-v1.0-small", "CheXpert-v1.0"], name,
                    "train.csv, valid.csv, train/, valid/", marker="train.csv")
    if not (root / "train.csv").is_file() or not (root / "valid.csv").is_file():
        raise DataError(f"chexpert: expected train.csv and valid.csv (and train/, valid/) in {root}")
    header = ["Path"] + CHEXPERT_META + CHEXPERT_FINDINGS
    tables = {s: read_csv(root / f"{s}.csv", header) for s in ("train", "valid")}

    def source_path(p):
        # CheXpert's Path starts with the dataset folder ("CheXpert-v1.0-small/train/..."): re-root it at --src
        parts = Path(p).parts
        return root.joinpath(*parts[1:]) if parts and parts[0].startswith("CheXpert") else root / p

    for s, rows in tables.items():
        check_exists([source_path(r["Path"]) for r in rows], name)
    blocks = _chexpert_5x200(tables["train"], seed)
    held_out = {i for b in blocks for i in b}
    with Output(out, root, copy, max_side) as o:
        line = lambda r: [o.place(source_path(r["Path"]))] + [r[c] for c in CHEXPERT_META + CHEXPERT_FINDINGS]
        train = [line(r) for i, r in enumerate(tables["train"]) if i not in held_out]
        o.write_csv("train.csv", header, train)
        o.write_csv("valid.csv", header, [line(r) for r in tables["valid"]])
        test = [line(tables["train"][i]) for b in blocks for i in b]
        o.write_csv("chexpert_5x200.csv", header, test)
        names = CLASSNAMES["chexpert5x200"]
        n = CHEXPERT_5X200_N
        split = {"train": [], "val": [], "test": [(row[0], k, names[k]) for k in range(len(blocks))
                                                  for row in test[k * n:(k + 1) * n]]}
        o.write_json("split_chexpert5x200.json", split_json(name, split, names))
        summary = {"counts": {"train": {"images": len(train)}, "valid": {"images": len(tables["valid"])},
                              "chexpert_5x200": {c: n for c in names}},
                   "notes": ["chexpert_5x200 = GLoRIA's rule (frontal, the finding is the only positive among the "
                             f"13 non-'No Finding' columns, blank = 0), 200 per class, seed {seed}; removed from "
                             "train.csv", "valid.csv = the official 234-image validation set"]}
        finish(o, name, root, seed, copy, max_side, summary)
    return summary


def dicom_to_uint8(pixels, photometric="MONOCHROME2"):
    """DICOM pixel array -> uint8 image the way CLEFT/ALTA do it: scale by 255/max, invert MONOCHROME1."""
    a = np.asarray(pixels, dtype=np.float64)
    a = a - min(a.min(), 0.0)  # signed data: shift so the darkest value is 0
    peak = a.max()
    a = np.zeros_like(a) if peak == 0 else a * 255.0 / peak  # multiply first: exact for integer pixels
    a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return 255 - a if photometric == "MONOCHROME1" else a


def read_dicom(path):
    """(pixel array, PhotometricInterpretation) of a DICOM file; needs pydicom (a prepare-only dependency)."""
    try:
        import pydicom
    except ImportError:
        raise DataError("reading DICOM needs pydicom, which only this converter uses: pip install pydicom "
                        "(JPEG-compressed files may also need pylibjpeg or gdcm)") from None
    try:
        ds = pydicom.dcmread(str(path))
        return ds.pixel_array, str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    except Exception as e:  # pydicom raises many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot decode DICOM ({type(e).__name__}: {e})") from None


def prepare_rsna(src, out, *, seed=0, copy=False, max_side=None):
    """RSNA Pneumonia stage 2: stage_2_train_labels.csv + stage_2_train_images/*.dcm -> PNGs, 70/15/15 split."""
    name, names = "rsna", CLASSNAMES["rsna"]
    labels_csv = find_file(src, ["stage_2_train_labels.csv"], name,
                           "stage_2_train_labels.csv and stage_2_train_images/")
    img_dir = find_dir(src, ["stage_2_train_images"], name, "stage_2_train_labels.csv and stage_2_train_images/")
    target = {}
    for r in read_csv(labels_csv, ["patientId", "Target"]):  # one row per box; a patient is positive if any
        if r["Target"] not in ("0", "1"):
            raise DataError(f"{labels_csv}: Target must be 0 or 1, got {r['Target']!r} for {r['patientId']}")
        target[r["patientId"]] = max(target.get(r["patientId"], 0), int(r["Target"]))
    ids = sorted(target)
    check_exists([img_dir / f"{p}.dcm" for p in ids], name)
    labels = [target[p] for p in ids]
    # MGCA's recipe: 70% train, the rest halved into valid and test, stratified here so each keeps the ratio
    rest_n = round(len(ids) * 0.3)
    tr, rest = stratified_split(labels, rest_n, seed)
    va_local, te_local = stratified_split([labels[i] for i in rest], rest_n - rest_n // 2, seed + 1)
    parts = {"train": tr, "val": [rest[i] for i in va_local], "test": [rest[i] for i in te_local]}
    with Output(out, src, copy=True, max_side=max_side) as o:  # converted PNGs always live in images/
        rel = {}
        for i in tr + rest:
            pixels, photometric = read_dicom(img_dir / f"{ids[i]}.dcm")
            rel[i] = o.save_image(f"images/{ids[i]}.png", dicom_to_uint8(pixels, photometric))
        items = {s: [(rel[i], labels[i], names[labels[i]]) for i in idx] for s, idx in parts.items()}
        summary = write_classification(o, name, items, names, notes=[
            f"stage_2_train_labels.csv (test images have no public labels); seeded stratified 70/15/15 by patient "
            f"(seed {seed}); DICOM -> 8-bit PNG scaled by 255/max, MONOCHROME1 inverted"])
        for s, fname in (("train", "train.csv"), ("val", "valid.csv"), ("test", "test.csv")):
            o.write_csv(fname, ["Path", "Pneumonia"], [[rel[i], labels[i]] for i in parts[s]])
        finish(o, name, src, seed, copy, max_side, summary)
    return summary


SECTION_RE = re.compile(r"^\s*([A-Z][A-Z &/,()-]*[A-Z)]):", re.MULTILINE)


def report_sections(text):
    """{"FINDINGS": ..., "IMPRESSION": ...} of a MIMIC-CXR report; each section runs to the next HEADER:."""
    heads = list(SECTION_RE.finditer(text))
    out = {}
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())
        out.setdefault(m.group(1).strip(), body)
    return out


def _mimic_report_root(src):
    """Where the report .txt tree is: MIMIC-CXR's mimic-cxr-reports.zip unpacks to files/pXX/pN/sM.txt."""
    for c in ["", "mimic-cxr-reports", "reports"]:
        p = (src / c if c else src) / "files"
        if p.is_dir() and next(p.glob("p*/p*/s*.txt"), None) is not None:
            return p
    raise DataError(f"mimic-cxr: no report files (files/pXX/pNNNNNNNN/sNNNNNNNN.txt) under {src}, "
                    f"{src / 'mimic-cxr-reports'} or {src / 'reports'}: unzip MIMIC-CXR's mimic-cxr-reports.zip there")


def prepare_mimic_cxr(src, out, *, seed=0, copy=False, max_side=None):
    """MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports -> per-study image-report CSVs (ALTA's 5 columns) + label CSVs.

    One row per study that has a frontal (PA, else AP) image and a FINDINGS or IMPRESSION section:
    image_path = that frontal image, auxview_image_path = a lateral (LATERAL, else LL) of the same study,
    last_image_path / last_auxview_image_path = the frontal / lateral of the patient's previous study by
    StudyDate + StudyTime (only studies with a frontal count as previous), report = FINDINGS + " " + IMPRESSION.
    "-1" marks a missing view. Studies whose images are not on disk are skipped and counted (subsets are common).
    """
    name = "mimic-cxr"
    need = "mimic-cxr-2.0.0-{metadata,split,chexpert}.csv(.gz) and files/"
    meta_p = find_file(src, ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"], name, need)
    split_p = find_file(src, ["mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"], name, need)
    chex_p = find_file(src, ["mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"], name, need)
    files = find_dir(src, ["files"], name, need)
    reports = _mimic_report_root(src)
    meta = read_csv(meta_p, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"])
    split_of = {r["dicom_id"]: r["split"] for r in read_csv(split_p, ["dicom_id", "split"])}
    chex = {r["study_id"]: r for r in read_csv(chex_p, ["subject_id", "study_id"] +
                                               [f for f in CHEXPERT_FINDINGS])}
    studies = defaultdict(lambda: {"frontal": [], "lateral": []})
    for r in meta:
        view = r["ViewPosition"]
        kind = "frontal" if view in ("PA", "AP") else "lateral" if view in ("LATERAL", "LL") else None
        if kind is None:
            continue
        img = files / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}" / f"s{r['study_id']}" / f"{r['dicom_id']}.jpg"
        s = studies[(r["subject_id"], r["study_id"])]
        s[kind].append((0 if view in ("PA", "LATERAL") else 1, r["dicom_id"], img))
        s["when"] = (r["StudyDate"], r["StudyTime"].zfill(10))
        s["split"] = split_of.get(r["dicom_id"], s.get("split"))  # official split is per patient
    skipped = Counter()

    def pick(views):
        """Preferred view (PA over AP, LATERAL over LL, then dicom_id) that exists on disk, or None."""
        for _, _, img in sorted(views):
            if img.is_file():
                return img
        return None

    by_subject = defaultdict(list)
    for (subj, study), s in studies.items():
        s["frontal_img"], s["lateral_img"] = pick(s["frontal"]), pick(s["lateral"])
        if s["frontal_img"] is None:
            skipped["no frontal image on disk"] += 1
            continue
        if s["split"] not in ("train", "validate", "test"):
            skipped["not in the split file"] += 1
            continue
        by_subject[subj].append((s["when"], study, s))
    rows = defaultdict(list)
    with Output(out, src, copy, max_side) as o:
        for subj, seq in sorted(by_subject.items()):
            seq.sort()
            prev = None
            for when, study, s in seq:
                path = reports / f"p{subj[:2]}" / f"p{subj}" / f"s{study}.txt"
                sec = report_sections(path.read_text(errors="replace")) if path.is_file() else {}
                text = " ".join(t for t in (sec.get("FINDINGS", ""), sec.get("IMPRESSION", "")) if t)
                if not path.is_file():
                    skipped["no report file"] += 1
                elif not text:
                    skipped["no FINDINGS or IMPRESSION section"] += 1
                else:
                    ref = lambda img: o.place(img) if img is not None else "-1"
                    lab = chex.get(study)
                    rows[s["split"]].append((
                        [ref(s["frontal_img"]), text, ref(s["lateral_img"]),
                         ref(prev["frontal_img"]) if prev else "-1", ref(prev["lateral_img"]) if prev else "-1",
                         sec.get("FINDINGS", ""), sec.get("IMPRESSION", ""), subj, study],
                        [ref(s["frontal_img"])] + [lab[f] if lab else "" for f in CHEXPERT_FINDINGS]))
                prev = s  # the previous study only needs a frontal image, not a usable report
        if not any(rows.values()):
            raise DataError(f"mimic-cxr: no study has both a frontal JPEG under {files} and a report under "
                            f"{reports}")
        header = ["image_path", "report", "auxview_image_path", "last_image_path", "last_auxview_image_path",
                  "findings", "impression", "subject_id", "study_id"]
        counts = {}
        for split in ("train", "validate", "test"):
            o.write_csv(f"reports_{split}.csv", header, [r for r, _ in rows[split]])
            o.write_csv(f"labels_{split}.csv", ["Path"] + CHEXPERT_FINDINGS, [l for _, l in rows[split]])
            rs = rows[split]
            counts[split] = {"studies": len(rs), "with_lateral": sum(r[2] != "-1" for r, _ in rs),
                             "with_previous": sum(r[3] != "-1" for r, _ in rs)}
        summary = {"counts": counts, "skipped": dict(skipped), "notes": [
            "one row per study: frontal PA>AP, lateral LATERAL>LL, previous study by StudyDate+StudyTime; "
            "report = FINDINGS + IMPRESSION; official split (mimic-cxr-2.0.0-split)"]}
        finish(o, name, src, seed, copy, max_side, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------
# CT (medct_lora.py)

CT_RATE_FINDINGS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
]


def prepare_ct_rate(src, out, *, seed=0, copy=False, max_side=None):
    """CT-RATE: volumes + reports, 18-label and metadata CSVs -> the CSVs common.ct.CTVolumeDataset reads.

    The v2 pitfall (CT-CLIP issue #50): v2 volumes (dataset/train_fixed, valid_fixed) are already in HU, but
    the metadata CSV still lists the DICOM RescaleSlope/RescaleIntercept; CT-CLIP's loader applies them again.
    We pick v2 when its folders exist (else v1 train/, valid/) and, for v2, write RescaleSlope 1 and
    RescaleIntercept 0 into metadata.csv (keeping the DICOM values as DicomRescaleSlope/-Intercept), so the
    default CTVolumeDataset(..., metadata_csv=...) rescale is right for either version.
    """
    name = "ct-rate"
    root = find_dir(src, ["dataset", ""], name, "dataset/{train_fixed or train}/, radiology_text_reports/, "
                    "multi_abnormality_labels/ and metadata/", marker="metadata")
    v2 = (root / "train_fixed").is_dir() or (root / "valid_fixed").is_dir()
    files = {
        "train": ("train_fixed" if v2 else "train", "radiology_text_reports/train_reports.csv",
                  "multi_abnormality_labels/train_predicted_labels.csv", "metadata/train_metadata.csv"),
        "valid": ("valid_fixed" if v2 else "valid", "radiology_text_reports/validation_reports.csv",
                  "multi_abnormality_labels/valid_predicted_labels.csv", "metadata/validation_metadata.csv"),
    }
    for split, (vol, *csvs) in files.items():
        for c in csvs:
            if not (root / c).is_file():
                raise DataError(f"ct-rate: expected {c} under {root} (the CT-RATE CSVs); it is missing")
        if not (root / vol).is_dir():
            raise DataError(f"ct-rate: expected the volume folder {root / vol}/ (v2: train_fixed, valid_fixed; "
                            f"v1: train, valid)")
    summary = {"counts": {}, "skipped": {}, "ct_rate_version": 2 if v2 else 1, "notes": []}
    with Output(out, root, link_raw=False) as o:  # volumes are referenced per split folder, see below
        meta_rows = []
        for split, (vol, rep_csv, lab_csv, meta_csv) in files.items():
            on_disk = {}
            for dirpath, _, fnames in os.walk(root / vol):
                for fn in fnames:
                    if fn.endswith(".nii.gz"):
                        on_disk[fn] = Path(dirpath) / fn
            labels = read_csv(root / lab_csv, ["VolumeName"] + CT_RATE_FINDINGS)
            meta = {r["VolumeName"]: r for r in read_csv(root / meta_csv, ["VolumeName", "RescaleSlope",
                                                                             "RescaleIntercept", "XYSpacing",
                                                                             "ZSpacing"])}
            keep, skipped = [], Counter()
            for r in labels:
                vals = [r[f] for f in CT_RATE_FINDINGS]
                if r["VolumeName"] not in on_disk:
                    skipped["volume not on disk"] += 1
                elif r["VolumeName"] not in meta:
                    skipped["no metadata row"] += 1
                elif any(v not in ("0", "1", "0.0", "1.0") for v in vals):
                    skipped["label not 0/1"] += 1
                else:
                    keep.append([r["VolumeName"]] + [str(int(float(v))) for v in vals])
            if not keep:
                raise DataError(f"ct-rate: none of the {len(labels)} volumes in {lab_csv} is under {root / vol}")
            names = {k[0] for k in keep}
            # the CT volumes: a symlink per split (CTVolumeDataset's root), or copies of the kept ones with --copy
            vdir = o.tmp / f"volumes_{split}"
            if copy:
                for n in sorted(names):
                    dst = vdir / on_disk[n].relative_to(root / vol)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(on_disk[n], dst)
            else:
                os.symlink((root / vol).resolve(), vdir, target_is_directory=True)
            o.write_csv(f"labels_{split}.csv", ["VolumeName"] + CT_RATE_FINDINGS, keep)
            rep_cols = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
            reps = read_csv(root / rep_csv, ["VolumeName", "Findings_EN", "Impressions_EN"])
            o.write_csv(f"reports_{split}.csv", rep_cols,
                        [[r.get(c, "") for c in rep_cols] for r in reps if r["VolumeName"] in names])
            for n in [k[0] for k in keep]:
                r = meta[n]
                slope, inter = ("1", "0") if v2 else (r["RescaleSlope"], r["RescaleIntercept"])
                meta_rows.append([n, slope, inter, r["XYSpacing"], r["ZSpacing"], r["RescaleSlope"],
                                  r["RescaleIntercept"]])
            summary["counts"][split] = {"volumes": len(keep),
                                        **{f: sum(k[1 + i] == "1" for k in keep) for i, f in
                                           enumerate(CT_RATE_FINDINGS)}}
            summary["skipped"][split] = dict(skipped)
        o.write_csv("metadata.csv", ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing",
                                     "DicomRescaleSlope", "DicomRescaleIntercept"], meta_rows)
        summary["notes"].append(
            f"CT-RATE v{2 if v2 else 1} ({files['train'][0]}/, {files['valid'][0]}/); "
            + ("v2 volumes are already HU: metadata.csv has RescaleSlope 1 / RescaleIntercept 0 (DICOM values kept "
               "in DicomRescale*), avoiding CT-CLIP issue #50's double rescale" if v2 else
               "v1 volumes store raw values: metadata.csv keeps the DICOM RescaleSlope/RescaleIntercept"))
        finish(o, name, root, seed, copy, max_side, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------
# bookkeeping and the command line

CONVERTERS = {
    "isic": prepare_isic, "dermamnist": prepare_dermamnist, "derm7pt": prepare_derm7pt,
    "aptos2019": prepare_aptos2019, "kvasir": prepare_kvasir, "pneumonia": prepare_pneumonia,
    "cpn-x-ray": prepare_cpn_x_ray, "chaoyang": prepare_chaoyang, "fetal-us": prepare_fetal_us,
    "adam": prepare_adam, "odir": prepare_odir,
    "chexpert": prepare_chexpert, "rsna": prepare_rsna, "mimic-cxr": prepare_mimic_cxr,
    "ct-rate": prepare_ct_rate,
}


def finish(o, name, src, seed, copy, max_side, summary):
    """Write prepare.json (source, options, counts, the paper's counts) into the output being built."""
    record = {"dataset": name, "source": str(Path(src).resolve()), "project_version": VERSION,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seed": seed, "copy": bool(copy), "max_side": max_side, "files": sorted(o.files),
              "paper_counts": PAPER_COUNTS.get(name, {}), **summary}
    o.write_json("prepare.json", record)


def counts_table(name, summary):
    """Lines of a 'split | class | ours | paper' table."""
    paper = PAPER_COUNTS.get(name, {})
    per_class = paper.get("per_class", {})
    lines = [f"{'split':<16} {'class':<48} {'ours':>8} {'paper':>8}"]  # paper: blank = not given
    for split, by_class in summary["counts"].items():
        if not isinstance(by_class, dict) or not any(by_class.values()):
            continue  # e.g. the empty "val" of the train/test-only datasets
        for k, (cls, n) in enumerate(by_class.items()):
            ref = per_class.get(split, [None] * len(by_class))[k] if split in per_class else None
            lines.append(f"{split:<16} {str(cls)[:48]:<48} {n:>8} {'' if ref is None else ref:>8}")
        total = sum(v for v in by_class.values() if isinstance(v, int)) if "volumes" not in by_class else None
        if total is not None and len(by_class) > 1:
            ref = paper.get(split)
            lines.append(f"{split:<16} {'(all)':<48} {total:>8} {'' if ref is None else ref:>8}")
    return lines


def default_out(name):
    return REPO_ROOT / "data" / name


def run(name, src, out=None, *, seed=0, copy=False, max_side=None, force=False):
    """Convert unless data/NAME is already prepared (then return its prepare.json); --force rebuilds."""
    if name not in CONVERTERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(CONVERTERS)}")
    src = Path(src).expanduser()
    if not src.exists():
        raise DataError(f"{name}: source {src} does not exist")
    out = Path(out).expanduser() if out else default_out(name)
    if out.exists() and not force:
        if (out / "prepare.json").is_file():
            print(f"{out} is already prepared (prepare.json); --force rebuilds it")
            return json.loads((out / "prepare.json").read_text())
        raise DataError(f"{out} exists but has no prepare.json (not ours, or an old layout); "
                        f"remove it or pass --force")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise DataError(f"--out {out} is inside --src {src}: the source is never modified; choose another --out")
    if o in s.parents:
        raise DataError(f"--src {src} is inside --out {out}, which a rebuild replaces; move the download first")
    return CONVERTERS[name](src, out, seed=seed, copy=copy, max_side=max_side)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("name", nargs="?", help="dataset name (see --list)")
    ap.add_argument("--src", help="the folder the official download was unpacked into")
    ap.add_argument("--out", help="output folder (default: data/NAME in the repository)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the splits the papers do not fix")
    ap.add_argument("--copy", action="store_true", help="copy the images instead of symlinking the source")
    ap.add_argument("--max-side", type=int, default=None, help="copy images shrunk so the longer side is <= N")
    ap.add_argument("--force", action="store_true", help="rebuild an existing output folder")
    ap.add_argument("--list", action="store_true", help="list the datasets")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for n, fn in CONVERTERS.items():
            print(f"{n:<12} {fn.__doc__.splitlines()[0]}")
        return 0
    if not args.src:
        ap.error("--src is required")
    try:
        summary = run(args.name, args.src, args.out, seed=args.seed, copy=args.copy, max_side=args.max_side,
                      force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(counts_table(args.name, summary)))
    for k, v in summary.get("skipped", {}).items():
        if v:
            print(f"skipped ({k}): {v}")
    for note in summary.get("notes", []):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
