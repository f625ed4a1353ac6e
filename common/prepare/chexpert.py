"""CheXpert v1.0: multi-label CSVs and GLoRIA's CheXpert-5x200 (cleft.py, alta.py); ConVIRT's CheXpert 8x200
image->image and text->image retrieval sets (alta.py)."""
from pathlib import Path

import numpy as np

from common.data import CHEXPERT_FINDINGS, DataError
from common.prepare.util import Output, check_exists, find_dir, finish, read_csv, split_json

PAPER_COUNTS = {"chexpert": {"chexpert_5x200": 1000},  # what GLoRIA's CheXpert-5x200 recipe fixes
                # ConVIRT's release: 8 x 200 candidates, 10 query images and 5 text queries per class
                "chexpert8x200": {"candidates": 1600, "image_queries": 80, "text_queries": 40}}
CLASSNAMES = {"chexpert5x200": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"],
              # in CheXpert's column order; ALTA's eval scripts use the column indices 0, 2, 5, 7, 8, 9, 10, 12
              "chexpert8x200": ["No Finding", "Cardiomegaly", "Edema", "Pneumonia", "Atelectasis", "Pneumothorax",
                                "Pleural Effusion", "Fracture"]}
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


def prepare_chexpert(src, out, *, seed=0, **opts):
    """CheXpert v1.0 (or -small): train.csv / valid.csv -> multi-label CSVs + the CheXpert-5x200 test set."""
    name = "chexpert"
    root = find_dir(src, ["", "CheXpert-v1.0-small", "CheXpert-v1.0"], name,
                    "train.csv, valid.csv, train/, valid/", marker="train.csv")
    if not (root / "train.csv").is_file() or not (root / "valid.csv").is_file():
        raise DataError(f"chexpert: expected train.csv and valid.csv (and train/, valid/) in {root}")
    header = ["Path"] + CHEXPERT_META + CHEXPERT_FINDINGS
    warnings = []
    tables = {s: read_csv(root / f"{s}.csv", header, unique=["Path"], warnings=warnings) for s in ("train", "valid")}

    def source_path(p):
        # CheXpert's Path starts with the dataset folder ("CheXpert-v1.0-small/train/..."): re-root it at --src
        parts = Path(p).parts
        return root.joinpath(*parts[1:]) if parts and parts[0].startswith("CheXpert") else root / p

    for s, rows in tables.items():
        check_exists([source_path(r["Path"]) for r in rows], name)
    blocks = _chexpert_5x200(tables["train"], seed)
    held_out = {i for b in blocks for i in b}
    with Output(out, root, seed=seed, **opts) as o:
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
                             "train.csv", "valid.csv = the official 234-image validation set"], "warnings": warnings}
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary




CHEXPERT_8X200_N = 200  # candidates per class in ConVIRT's sets (a name so tests can use a tiny mock)


def prepare_chexpert8x200(src, out, **opts):
    """ConVIRT's CheXpert 8x200 retrieval sets (image-retrieval/, text-retrieval/) + the CheXpert images."""
    name, names = "chexpert8x200", CLASSNAMES["chexpert8x200"]
    sets = next((src / c for c in ("", "convirt", "CheXpert8X200_dataset")
                 if (src / c / "image-retrieval" / "candidate.csv").is_file()), None)
    if sets is None or not (sets / "text-retrieval" / "query.csv").is_file():
        raise DataError(f"chexpert8x200: expected ConVIRT's image-retrieval/{{candidate,query}}.csv and "
                        f"text-retrieval/{{candidate,query}}.csv in {src} (or {src / 'convirt'}): git clone "
                        f"https://github.com/yuhaozhang/convirt there, next to the CheXpert folder")
    # the files name images as "CheXpert-v1.0-small/train/..."; the full-size download has the same tree
    folders = [d for d in ("CheXpert-v1.0-small", "CheXpert-v1.0") if (src / d / "train").is_dir()]
    if not folders:
        raise DataError(f"chexpert8x200: expected the CheXpert download (CheXpert-v1.0-small/train/ or "
                        f"CheXpert-v1.0/train/) in {src}, next to ConVIRT's folders")
    image = lambda p: src.joinpath(folders[0], *Path(p).parts[1:]) if Path(p).parts[0].startswith("CheXpert") \
        else src / p
    warnings = []
    meta = ["Path"] + CHEXPERT_META + CHEXPERT_FINDINGS
    tables = {
        "image-retrieval/candidate.csv": read_csv(sets / "image-retrieval" / "candidate.csv", meta,
                                                  unique=["Path"], warnings=warnings),
        "text-retrieval/candidate.csv": read_csv(sets / "text-retrieval" / "candidate.csv", meta,
                                                 unique=["Path"], warnings=warnings),
        "image-retrieval/query.csv": read_csv(sets / "image-retrieval" / "query.csv", ["Variable", "Path"],
                                              unique=["Path"], warnings=warnings),
        "text-retrieval/query.csv": read_csv(sets / "text-retrieval" / "query.csv", ["Variable", "Text"],
                                             unique=["Text"], warnings=warnings),
    }
    candidates = tables["image-retrieval/candidate.csv"]
    for fname in ("image-retrieval/candidate.csv", "text-retrieval/candidate.csv"):
        for r in tables[fname]:
            positive = [f for f in CHEXPERT_FINDINGS if r[f] in ("1", "1.0")]
            if len(positive) != 1 or positive[0] not in names:
                raise DataError(f"{sets / fname}: {r['Path']} has positive finding(s) {positive}; every candidate "
                                f"must have exactly one, among {names} (ALTA's evaluation takes the single 1 as "
                                f"its class)")
    if [r["Path"] for r in tables["text-retrieval/candidate.csv"]] != [r["Path"] for r in candidates]:
        warnings.append("text-retrieval/candidate.csv and image-retrieval/candidate.csv list different images "
                        "(in ConVIRT's release they are the same file); both are kept as given")
    for fname in ("image-retrieval/query.csv", "text-retrieval/query.csv"):
        bad = sorted({r["Variable"] for r in tables[fname]} - set(names))
        if bad:
            raise DataError(f"{sets / fname}: Variable {bad} is not one of {names}")
    label = lambda r: names.index(next(f for f in CHEXPERT_FINDINGS if r[f] in ("1", "1.0")))
    per_class = [sum(label(r) == k for r in candidates) for k in range(len(names))]
    if per_class != [CHEXPERT_8X200_N] * len(names):
        warnings.append(f"candidates per class {dict(zip(names, per_class))}, not {CHEXPERT_8X200_N} each as in "
                        f"ConVIRT's release")
    query_images = tables["image-retrieval/query.csv"]
    check_exists([image(r["Path"]) for r in candidates + tables["text-retrieval/candidate.csv"] + query_images],
                 name)
    with Output(out, src, **opts) as o:
        ref = {r["Path"]: o.place(image(r["Path"])) for r in candidates + tables["text-retrieval/candidate.csv"]
               + query_images}
        for fname in ("image-retrieval/candidate.csv", "text-retrieval/candidate.csv"):
            (o.tmp / fname).parent.mkdir(exist_ok=True)
            o.write_csv(fname, meta, [[ref[r["Path"]]] + [r[c] for c in meta[1:]] for r in tables[fname]])
        o.write_csv("image-retrieval/query.csv", ["Variable", "Path"],
                    [[r["Variable"], ref[r["Path"]]] for r in query_images])
        o.write_csv("text-retrieval/query.csv", ["Variable", "Text"],
                    [[r["Variable"], r["Text"]] for r in tables["text-retrieval/query.csv"]])
        o.write_json("split_chexpert8x200.json", split_json(name, {"test": [
            (ref[r["Path"]], label(r), names[label(r)]) for r in candidates]}, names))
        o.write_json("split_chexpert8x200_query.json", split_json(name, {"test": [
            (ref[r["Path"]], names.index(r["Variable"]), r["Variable"]) for r in query_images]}, names))
        count = lambda rows, key: {c: sum(key(r) == c for r in rows) for c in names}
        summary = {"counts": {"candidates": dict(zip(names, per_class)),
                              "image_queries": count(query_images, lambda r: r["Variable"]),
                              "text_queries": count(tables["text-retrieval/query.csv"], lambda r: r["Variable"])},
                   "classnames": names, "warnings": warnings, "notes": [
                       "ConVIRT's four files with Path re-rooted at raw/ (so ALTA's CheXpert8X200_* scripts read "
                       "them with chexpert_root = this folder); split_chexpert8x200.json = the candidates, "
                       "split_chexpert8x200_query.json = the query images, labels in CLASSNAMES order"]}
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary
