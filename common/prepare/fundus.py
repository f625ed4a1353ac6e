"""Fundus photographs: APTOS 2019, ADAM (iChallenge-AMD), ODIR-5K (cilmp.py)."""
import re

from common.data import DataError
from common.prepare.util import (Output, check_exists, class_folders, find_dir, find_file, finish, number,
                                 paper_test_size, read_csv, write_classification, write_seeded)

# CILMP's dataset table (train / test)
PAPER_COUNTS = {
    "aptos2019": {"train": 2930, "test": 732},
    "adam": {"train": 400, "test": 400},
    "odir": {"train": 5113, "test": 1279},
}

CLASSNAMES = {  # as the official CILMP loaders spell them, in label order
    "aptos2019": ["no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                  "severe diabetic retinopathy", "proliferative diabetic retinopathy"],
    "adam": ["normal fundus", "fundus with age-related macular degeneration"],
    "odir": ["normal", "diabetes", "glaucoma", "cataract", "age related macular degeneration", "hypertension",
             "pathological myopia", "other diseases or abnormalities"],
}


def prepare_aptos2019(src, out, **opts):
    """APTOS 2019 (Kaggle): train.csv (id_code, diagnosis 0-4) + train_images/; seeded stratified 80/20."""
    name, names = "aptos2019", CLASSNAMES["aptos2019"]
    csv_path = find_file(src, ["train.csv"], name, "train.csv and train_images/")
    img_dir = find_dir(src, ["train_images"], name, "train.csv and train_images/")
    warnings = []
    rows = read_csv(csv_path, ["id_code", "diagnosis"], unique=["id_code"], warnings=warnings)
    paths, labels = [], []
    for r in rows:
        y = number(r["diagnosis"], f"{csv_path}, id_code {r['id_code']}", int)
        if not 0 <= y < len(names):
            raise DataError(f"{csv_path}: diagnosis {y} for {r['id_code']} outside 0..4")
        paths.append(img_dir / f"{r['id_code']}.png")
        labels.append(y)
    check_exists(paths, name)
    return write_seeded(name, src, out, paths, labels, names, paper_test_size(PAPER_COUNTS[name], len(paths), 0.3),
                        "the test set has no public labels: seeded stratified split of train.csv, paper's 80/20",
                        PAPER_COUNTS[name], warnings=warnings, **opts)



def prepare_adam(src, out, **opts):
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
    paths, labels = class_folders(root / "Training400", folders, name)
    test_root = next((root / d for d in ("Validation400", "Validation-400", "Test400")
                      if (root / d / "AMD").is_dir()), None)
    if test_root is None:
        unlabelled = [d for d in ("Validation400", "Validation-400", "Test400") if (root / d).is_dir()]
        warnings = [f"adam: {unlabelled[0]}/ is there but has no AMD/ and Non-AMD/ label folders, so it is not "
                    f"used as the test set (sort its images by the released labels, see data/README.md)"
                    ] if unlabelled else []
        return write_seeded(name, root, out, paths, labels, names, round(len(paths) * 0.5),
                            "no labelled validation set found: seeded stratified 50/50 split of Training400",
                            PAPER_COUNTS[name], warnings=warnings, **opts)
    tpaths, tlabels = class_folders(test_root, folders, name)
    with Output(out, root, **opts) as o:
        items = {"train": [(o.place(p), y, names[y]) for p, y in zip(paths, labels)], "val": [],
                 "test": [(o.place(p), y, names[y]) for p, y in zip(tpaths, tlabels)]}
        summary = write_classification(o, name, items, names,
                                       notes=[f"train = Training400, test = {test_root.name}"])
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary



def prepare_odir(src, out, **opts):
    """ODIR-5K as on Kaggle: full_df.csv (one row per eye image, 'labels' like "['N']") + preprocessed_images/."""
    name, names = "odir", CLASSNAMES["odir"]
    csv_path = find_file(src, ["full_df.csv", "*/full_df.csv"], name, "full_df.csv and preprocessed_images/")
    img_dir = find_dir(csv_path.parent, ["preprocessed_images", "ODIR-5K/Training Images"], name,
                       "full_df.csv and preprocessed_images/")
    letters = "NDGCAHMO"  # the column order of the ODIR labels = CILMP's class order
    warnings = []
    rows = read_csv(csv_path, ["filename", "labels"], unique=["filename"], warnings=warnings)
    paths, labels = [], []
    for r in rows:
        m = re.fullmatch(r"\[\s*'([A-Z])'\s*\]", r["labels"])
        if not m or m.group(1) not in letters:
            raise DataError(f"{csv_path}: labels {r['labels']!r} for {r['filename']} is not one of "
                            f"['N'] ['D'] ... ['O']")
        paths.append(img_dir / r["filename"])
        labels.append(letters.index(m.group(1)))
    check_exists(paths, name)
    return write_seeded(name, csv_path.parent, out, paths, labels, names,
                        paper_test_size(PAPER_COUNTS[name], len(paths), 0.3),
                        "no labelled official test set: seeded stratified split of full_df.csv, paper's 80/20",
                        PAPER_COUNTS[name], warnings=warnings, **opts)


