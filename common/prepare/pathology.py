"""Colon histopathology: Chaoyang (cilmp.py)."""
import json

from common.data import DataError
from common.prepare.util import Output, check_exists, dedupe, find_dir, finish, write_classification

PAPER_COUNTS = {  # CILMP's dataset table (train / test); per class from the dataset's own README
    "chaoyang": {"train": 4021, "test": 2139,
                 # per class, in CLASSNAMES order (normal / serrated / adenocarcinoma / adenoma)
                 "per_class": {"train": [1111, 842, 1404, 664], "test": [705, 321, 840, 273]}},
}
CLASSNAMES = {"chaoyang": ["normal", "serrated", "adenocarcinoma", "adenoma"]}  # CILMP's label order


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
