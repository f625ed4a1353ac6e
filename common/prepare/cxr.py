"""Chest X-ray classification from class folders or list files: Kermany pneumonia, COVID/Pneumonia/Normal
(cilmp.py)."""
from common.data import DataError
from common.prepare.util import Output, finish, list_images, paper_test_size, write_classification, write_seeded

PAPER_COUNTS = {  # CILMP's dataset table (train / test)
    "pneumonia": {"train": 5216, "test": 624},
    "cpn-x-ray": {"train": 3659, "test": 1569},
}

CLASSNAMES = {  # as the official CILMP loaders spell them, in label order
    "pneumonia": ["normal", "bacteria pneumonia", "virus pneumonia"],
    "pneumonia2": ["normal", "pneumonia"],
    "cpn-x-ray": ["normal", "covid", "pneumonia"],
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
    return write_seeded(name, src, out, paths, labels, names, paper_test_size(PAPER_COUNTS[name], len(paths), 0.3),
                        "no official split: seeded stratified split, paper's 70/30", PAPER_COUNTS[name], **opts)


