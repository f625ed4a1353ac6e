"""Chest X-ray classification from class folders or list files: Kermany pneumonia, COVID/Pneumonia/Normal
(cilmp.py), COVIDx (adaptor.py)."""
import numpy as np

from common.data import DataError
from common.prepare.util import (Output, check_exists, finish, list_images, paper_test_size, write_classification,
                                 write_seeded)

PAPER_COUNTS = {  # CILMP's dataset table (train / test)
    "pneumonia": {"train": 5216, "test": 624},
    "cpn-x-ray": {"train": 3659, "test": 1569},
    "covidx": {},  # Adaptor gives no counts; the list files fix them
}

CLASSNAMES = {  # as the official CILMP loaders spell them, in label order
    "pneumonia": ["normal", "bacteria pneumonia", "virus pneumonia"],
    "pneumonia2": ["normal", "pneumonia"],
    "cpn-x-ray": ["normal", "covid", "pneumonia"],
    "covidx": ["normal", "pneumonia", "COVID-19"],  # MGCA's label order (the list files' class names)
}


def _kermany_root(src):
    """The chest_xray folder holding train/ and test/ (Kaggle's zip nests chest_xray/chest_xray)."""
    for c in ["", "chest_xray", "chest_xray/chest_xray", "ChestXRay2017/chest_xray"]:
        p = src / c if c else src
        if (p / "train" / "NORMAL").is_dir() and (p / "test" / "PNEUMONIA").is_dir():
            return p
    raise DataError(f"pneumonia: expected chest_xray/{{train,test,val}}/{{NORMAL,PNEUMONIA}}/ under {src}")


def prepare_pneumonia(src, out, **opts):
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
    with Output(out, root, **opts) as o:
        rel = {s: [(o.place(f), y3, y2) for f, y3, y2 in rows] for s, rows in raw.items()}
        items3 = {s: [(r, y3, names3[y3]) for r, y3, _ in rows] for s, rows in rel.items()}
        items2 = {s: [(r, y2, names2[y2]) for r, _, y2 in rows] for s, rows in rel.items()}
        summary = write_classification(o, "pneumonia", items3, names3, notes=[
            "official train/val/test folders; split_pneumonia2.json holds the 2-class (normal/pneumonia) version"])
        write_classification(o, "pneumonia2", items2, names2)
        finish(o, "pneumonia", summary, PAPER_COUNTS["pneumonia"])
    return summary



def prepare_cpn_x_ray(src, out, **opts):
    """COVID/Pneumonia/Normal chest X-rays in three class folders (any case); seeded stratified 70/30."""
    name, names = "cpn-x-ray", CLASSNAMES["cpn-x-ray"]
    found = {}
    for d in sorted(p for p in src.rglob("*") if p.is_dir()):
        key = d.name.lower()
        cls = "covid" if "covid" in key else key if key in ("normal", "pneumonia") else None
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
    return write_seeded(name, src, out, paths, labels, names, paper_test_size(PAPER_COUNTS[name], len(paths), 0.3),
                        "no official split: seeded stratified split, paper's 70/30", PAPER_COUNTS[name], **opts)




COVIDX_LABELS = {"normal": 0, "pneumonia": 1, "COVID-19": 2}  # MGCA's set_label: normal 0, pneumonia 1, else 2


def _covidx_lists(root):
    """(train list, test list): train_COVIDx9A.txt / test_COVIDx9A.txt (the version MGCA and Adaptor use), any
    other train_COVIDx*.txt with its test_ twin, or the plain train.txt / test.txt of the Kaggle releases; in
    the image root or its labels/ folder."""
    for folder in (root, root / "labels"):  # COVID-Net's repository keeps the lists in labels/
        for train in [folder / "train_COVIDx9A.txt", *sorted(folder.glob("train_COVIDx*.txt")), folder / "train.txt"]:
            test = train.with_name("test" + train.name[len("train"):])
            if train.is_file() and test.is_file():
                return train, test
    raise DataError(f"covidx: expected the COVIDx list files train_COVIDx9A.txt and test_COVIDx9A.txt (or "
                    f"train.txt and test.txt) next to the image folders train/ and test/ in {root}")


def read_covidx_list(path, warnings):
    """Rows "patient_id filename class source" (space-separated; a file name may hold spaces) -> [(file, class)]."""
    rows, seen = [], {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 4:
            raise DataError(f"{path}, line {n}: expected 'patient_id filename class source', got {line!r}")
        filename, cls = " ".join(parts[1:-2]), parts[-2]
        if cls in ("positive", "negative"):
            raise DataError(f"{path}: class {cls!r}: this is a binary COVIDx release (COVID-19 positive / "
                            f"negative); Adaptor's COVIDx task is 3-class (normal / pneumonia / COVID-19): use "
                            f"train_COVIDx9A.txt / test_COVIDx9A.txt (see data/README.md)")
        if cls not in COVIDX_LABELS:
            raise DataError(f"{path}, line {n}: class {cls!r} is not one of {list(COVIDX_LABELS)}")
        if filename in seen:
            if seen[filename] != cls:
                raise DataError(f"{path}: {filename} is listed twice with different classes "
                                f"({seen[filename]!r}, {cls!r}); fix the file")
            warnings.append(f"{path.name}: {filename} listed twice (same class): the repeat is dropped")
            continue
        seen[filename] = cls
        rows.append((filename, cls))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def mgca_train_val(n):
    """MGCA's COVIDx validation split, exactly: sklearn train_test_split(train_size=0.8, random_state=0), i.e. a
    permutation by numpy's RandomState(0), the first n - floor(0.8 n) to val and the rest to train, in that
    order (MGCA's --data_pct subsets sample that order). Not grouped by patient, as MGCA."""
    n_train = int(np.floor(0.8 * n))
    perm = np.random.RandomState(0).permutation(n)
    return perm[n - n_train:].tolist(), perm[:n - n_train].tolist()


def prepare_covidx(src, out, **opts):
    """COVIDx (3-class, e.g. 9A): train_COVIDx9A.txt / test_COVIDx9A.txt + train/, test/ -> split JSON."""
    name, names = "covidx", CLASSNAMES["covidx"]
    root = next((src / c for c in ("", "COVIDx", "covidx") if (src / c / "train").is_dir()), src)
    train_txt, test_txt = _covidx_lists(root)
    warnings = []
    raw = {"train": read_covidx_list(train_txt, warnings), "test": read_covidx_list(test_txt, warnings)}
    paths = {s: [root / s / f for f, _ in rows] for s, rows in raw.items()}
    check_exists(paths["train"] + paths["test"], name)
    tr, va = mgca_train_val(len(raw["train"]))
    label = lambda s, i: COVIDX_LABELS[raw[s][i][1]]
    with Output(out, root, **opts) as o:
        ref = {s: [o.place(p) for p in ps] for s, ps in paths.items()}
        items = {"train": [(ref["train"][i], label("train", i), names[label("train", i)]) for i in tr],
                 "val": [(ref["train"][i], label("train", i), names[label("train", i)]) for i in va],
                 "test": [(r, label("test", i), names[label("test", i)]) for i, r in enumerate(ref["test"])]}
        summary = write_classification(o, name, items, names, notes=[
            f"{train_txt.name} / {test_txt.name}; val = 20% of the train list by MGCA's split (sklearn "
            f"train_test_split(train_size=0.8, random_state=0), reproduced exactly with numpy; not grouped by "
            f"patient, as MGCA), train and val in MGCA's order; test = the official test list"], warnings=warnings)
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary
