"""Dermatology: ISIC 2018 Task 3, DermaMNIST, Derm7pt (cilmp.py)."""
import numpy as np

from common.data import DataError
from common.prepare.util import Output, check_exists, find_dir, finish, number, read_csv, write_classification

# The papers' numbers, printed next to ours: CILMP's dataset table (train / test).
PAPER_COUNTS = {
    "isic": {"train": 10015, "test": 1512},
    "dermamnist": {"train": 5600, "test": 2400},  # see data/README.md: the official split is 7007/1003/2005
    "derm7pt": {"train": 413, "test": 395},
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



def prepare_isic(src, out, **opts):
    """ISIC 2018 Task 3: official training images + one-hot CSV; official test set as test (validation as val)."""
    name, names = "isic", CLASSNAMES["isic"]
    cols = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]  # same order as the class names
    warnings = []

    def read_part(part, required=True):
        folder = src / f"ISIC2018_Task3_{part}_Input"
        gt = [src / f"ISIC2018_Task3_{part}_GroundTruth" / f"ISIC2018_Task3_{part}_GroundTruth.csv",
              src / f"ISIC2018_Task3_{part}_GroundTruth.csv"]
        gt = next((g for g in gt if g.is_file()), None)
        if not folder.is_dir() or gt is None:
            if not required:
                if folder.is_dir() or gt is not None:  # half of the pair: say so instead of an unexplained empty split
                    have, lack = ((f"{folder.name}/", f"ISIC2018_Task3_{part}_GroundTruth.csv") if gt is None
                                  else (gt.name, f"{folder.name}/"))
                    warnings.append(f"isic: {have} is there but {lack} is not, so the {part.lower()} split is "
                                    f"empty; download both {part} zips to use it")
                return []
            raise DataError(f"isic: {src} does not look like the ISIC 2018 Task 3 download: expected "
                            f"ISIC2018_Task3_{part}_Input/ and ISIC2018_Task3_{part}_GroundTruth/"
                            f"ISIC2018_Task3_{part}_GroundTruth.csv")
        rows = read_csv(gt, ["image"] + cols, unique=["image"], warnings=warnings)
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
    with Output(out, src, **opts) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in rows] for s, rows in parts.items()}
        summary = write_classification(o, name, items, names, notes=[
            "train = official training set, val = official validation set (when present), test = official test"],
            warnings=warnings)
        finish(o, name, summary, PAPER_COUNTS.get(name))
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


def prepare_dermamnist(src, out, **opts):
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
    with Output(out, path.parent, **{**opts, "copy": True}) as o:  # PNGs are always written
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
        finish(o, name, summary, PAPER_COUNTS.get(name), source=path)
    return summary



def prepare_derm7pt(src, out, **opts):
    """Derm7pt release_v0: meta/meta.csv + meta/{train,valid,test}_indexes.csv; dermoscopic image per case."""
    name, names = "derm7pt", CLASSNAMES["derm7pt"]
    root = find_dir(src, ["", "release_v0"], name, "meta/meta.csv and images/", marker="meta")
    meta = root / "meta" / "meta.csv"
    if not meta.is_file() or not (root / "images").is_dir():
        raise DataError(f"derm7pt: expected meta/meta.csv, meta/train_indexes.csv and images/ under {root}")
    rows = read_csv(meta, ["diagnosis", "derm"])
    items_raw, warnings = {}, []
    for split, fname in (("train", "train_indexes.csv"), ("val", "valid_indexes.csv"), ("test", "test_indexes.csv")):
        idx = [number(r["indexes"], root / "meta" / fname, int)
               for r in read_csv(root / "meta" / fname, ["indexes"], unique=["indexes"], warnings=warnings)]
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
    with Output(out, root, **opts) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in r] for s, r in items_raw.items()}
        summary = write_classification(o, name, items, names, notes=[
            "official train/valid/test index files; 20 diagnoses -> 5 classes by DERM7PT_MAP (derm7pt's grouping)"],
            warnings=warnings)
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary


