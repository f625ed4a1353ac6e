"""CheXpert v1.0: multi-label CSVs and GLoRIA's CheXpert-5x200 (cleft.py, alta.py)."""
from pathlib import Path

import numpy as np

from common.data import CHEXPERT_FINDINGS, DataError
from common.prepare.util import Output, check_exists, find_dir, finish, read_csv, split_json

PAPER_COUNTS = {"chexpert": {"chexpert_5x200": 1000}}  # what GLoRIA's CheXpert-5x200 recipe fixes
CLASSNAMES = {"chexpert5x200": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]}
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


