"""Endoscopy, histopathology and fetal ultrasound: Kvasir v2, Chaoyang, FETAL_PLANES_DB (cilmp.py)."""
import json

from common.data import DataError
from common.prepare.util import (Output, check_exists, class_folders, dedupe, find_dir, find_file, finish,
                                 paper_test_size, read_csv, write_classification, write_seeded)

# CILMP's dataset table (train / test); Chaoyang's per-class counts from the dataset's own README
PAPER_COUNTS = {
    "kvasir": {"train": 5600, "test": 2400},
    "chaoyang": {"train": 4021, "test": 2139,
                 # per class, in CLASSNAMES order (normal / serrated / adenocarcinoma / adenoma)
                 "per_class": {"train": [1111, 842, 1404, 664], "test": [705, 321, 840, 273]}},
    "fetal-us": {"train": 7129, "test": 5271},
}

CLASSNAMES = {  # as the official CILMP loaders spell them, in label order
    "kvasir": ["dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum", "normal pylorus",
               "normal z-line", "polyps", "ulcerative colitis"],
    "chaoyang": ["normal", "serrated", "adenocarcinoma", "adenoma"],
    "fetal-us": ["Fetal brain", "Fetal femur", "Fetal abdomen", "Fetal thorax", "Maternal cervix",
                 "Other planes"],
}


def prepare_kvasir(src, out, **opts):
    """Kvasir v2: 8 class folders of 1000 JPEGs; seeded stratified 70/30 (5600/2400)."""
    name, names = "kvasir", CLASSNAMES["kvasir"]
    root = find_dir(src, ["kvasir-dataset-v2", ""], name, "kvasir-dataset-v2/<8 class folders>",
                    marker="polyps")
    folders = {c.replace(" ", "-"): i for i, c in enumerate(names)}
    paths, labels = class_folders(root, folders, name)
    return write_seeded(name, root, out, paths, labels, names, paper_test_size(PAPER_COUNTS[name], len(paths), 0.3),
                        "no official split: seeded stratified split, paper's 70/30", PAPER_COUNTS[name], **opts)



def prepare_chaoyang(src, out, **opts):
    """Chaoyang: train.json / test.json lists of {"name": relpath, "label": 0-3}; official split."""
    name, names = "chaoyang", CLASSNAMES["chaoyang"]
    root = find_dir(src, ["", "chaoyang-data"], name, "train.json, test.json, train/ and test/",
                    marker="train.json")
    raw, warnings = {"val": []}, []
    for split in ("train", "test"):
        path = root / f"{split}.json"
        if not path.is_file():
            raise DataError(f"chaoyang: expected train.json and test.json in {root}; {path.name} is missing")
        try:
            entries = [{"name": e["name"], "label": int(e["label"])} for e in json.loads(path.read_text())]
            entries = dedupe(entries, ["name"], path, warnings)
            raw[split] = [(root / e["name"], e["label"]) for e in entries]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: expected a list of {{\"name\": ..., \"label\": ...}} ({e})") from None
        bad = [y for _, y in raw[split] if not 0 <= y < len(names)]
        if bad:
            raise DataError(f"{path}: labels {sorted(set(bad))} outside 0..3")
        check_exists([p for p, _ in raw[split]], name)
    with Output(out, root, **opts) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in rows] for s, rows in raw.items()}
        summary = write_classification(o, name, items, names, notes=["official train.json / test.json"],
                                       warnings=warnings)
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary



def prepare_fetal_us(src, out, **opts):
    """FETAL_PLANES_DB: FETAL_PLANES_DB_data.csv (';'-separated, Train 1/0) + Images/<Image_name>.png."""
    name, names = "fetal-us", CLASSNAMES["fetal-us"]
    csv_path = find_file(src, ["FETAL_PLANES_DB_data.csv", "*/FETAL_PLANES_DB_data.csv"], name,
                         "FETAL_PLANES_DB_data.csv and Images/")
    img_dir = csv_path.parent / "Images"
    plane_to_class = {"Fetal brain": 0, "Fetal femur": 1, "Fetal abdomen": 2, "Fetal thorax": 3,
                      "Maternal cervix": 4, "Other": 5}
    warnings = []
    rows = read_csv(csv_path, ["Image_name", "Plane", "Train"], unique=["Image_name"], warnings=warnings)
    raw = {"train": [], "val": [], "test": []}
    for r in rows:
        if r["Plane"] not in plane_to_class:
            raise DataError(f"{csv_path}: unknown Plane {r['Plane']!r} for {r['Image_name']}")
        if r["Train"] not in ("0", "1"):
            raise DataError(f"{csv_path}: Train must be 1 or 0, got {r['Train']!r} for {r['Image_name']}")
        raw["train" if r["Train"] == "1" else "test"].append((img_dir / f"{r['Image_name']}.png",
                                                              plane_to_class[r["Plane"]]))
    check_exists([p for v in raw.values() for p, _ in v], name)
    with Output(out, csv_path.parent, **opts) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in v] for s, v in raw.items()}
        summary = write_classification(o, name, items, names, notes=[
            "official split from the Train column; Plane 'Other' is the class 'Other planes'"], warnings=warnings)
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary


