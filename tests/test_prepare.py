"""Tests for common/prepare/: each converter on a tiny mock of its dataset's official layout (exact file
names and CSV columns), read back through the readers in common/data.py and common/ct.py.

Expected counts are worked out by hand in the comments (largest-remainder allocation of the paper's test
fraction); nothing here is computed by the code under test and then compared with itself.
"""
import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import prepare
from common.prepare import chexpert, ct_rate, derm, mimic, rsna
from common.ct import CTVolumeDataset, read_nifti, write_nifti
from common.data import (SOURCES, CHEXPERT_FINDINGS, ClassificationDataset, DataError, ImageReportDataset,
                         MultiLabelDataset, read_split)


# ---------------------------------------------------------------------------------------------------------
# mock helpers


def img(path, size=(8, 8), value=None):
    """Write a tiny image (JPEG/PNG by extension); value fixes a uniform gray level."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    a = np.full((size[1], size[0], 3), value, np.uint8) if value is not None else \
        rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def write_csv(path, header, rows, delimiter=","):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open(path, "wt", newline="") if path.suffix == ".gz" else open(path, "w", newline="")
    with opener as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def split_counts(path, split):
    """{classname: n} of one split of a split JSON, read with the foundation reader."""
    counts = {}
    for _, _, c in read_split(path)[split]:
        counts[c] = counts.get(c, 0) + 1
    return counts


def snapshot(folder):
    """Every file under folder with its size and mtime: the source must come out of a conversion unchanged."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# splitting


def test_allocate_largest_remainder():
    # 5 test items over class sizes [10, 5, 4, 3, 3] (25): exact shares 2.0, 1.0, 0.8, 0.6, 0.6 -> floors
    # [2, 1, 0, 0, 0] (3), the two missing go to the largest remainders .8 (class 2) and the first .6 (class 3)
    assert prepare.allocate([10, 5, 4, 3, 3], 5) == [2, 1, 1, 1, 0]
    assert prepare.allocate([1000] * 8, 2400) == [300] * 8  # Kvasir: 300 per class


def test_stratified_split_is_seeded_and_exact():
    labels = [0] * 30 + [1] * 12
    tr, te = prepare.stratified_split(labels, 14, seed=0)
    assert len(te) == 14 and sorted(tr + te) == list(range(42))
    assert sum(labels[i] for i in te) == 4  # 12 * 14 / 42 = 4 of class 1, 10 of class 0
    assert prepare.stratified_split(labels, 14, seed=0) == (tr, te)
    assert prepare.stratified_split(labels, 14, seed=1)[1] != te


# ---------------------------------------------------------------------------------------------------------
# ISIC 2018 (also: CLI, wrong source, interrupted write, idempotence, --max-side, source untouched)

ISIC_COLS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def make_isic(root, per_class=(2, 1, 1), size=(8, 8)):
    """ISIC2018_Task3_{Training,Validation,Test}_{Input,GroundTruth} with per_class images of each class."""
    k = 0
    for part, n in zip(("Training", "Validation", "Test"), per_class):
        rows = []
        for c in range(7):
            for _ in range(n):
                name = f"ISIC_{k:07d}"
                img(root / f"ISIC2018_Task3_{part}_Input" / f"{name}.jpg", size=size)
                rows.append([name] + ["1.0" if j == c else "0.0" for j in range(7)])
                k += 1
        write_csv(root / f"ISIC2018_Task3_{part}_GroundTruth" / f"ISIC2018_Task3_{part}_GroundTruth.csv",
                  ["image"] + ISIC_COLS, rows)
    return root


def test_isic_cli_and_read_back(tmp_path, capsys):
    src = make_isic(tmp_path / "raw")
    before = snapshot(src)
    out = tmp_path / "data" / "isic"
    assert prepare.main(["isic", "--src", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10015" in printed and "1512" in printed  # the paper's numbers next to ours
    assert snapshot(src) == before  # never modifies the source
    assert (out / "raw").is_symlink()
    split = out / "split_isic.json"
    ds = ClassificationDataset(out, split, "train")
    assert ds.classnames == prepare.CLASSNAMES["isic"]
    assert len(ds) == 14 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert ds[0][0].shape == (3, 8, 8)
    assert split_counts(split, "val") == {c: 1 for c in prepare.CLASSNAMES["isic"]}
    assert read_split(split)["test"][0][0] == "raw/ISIC2018_Task3_Test_Input/ISIC_0000021.jpg"
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["counts"]["test"]["Melanoma"] == 1 and meta["paper_counts"]["train"] == 10015
    assert meta["project_version"] == prepare.VERSION and meta["source"] == str(src.resolve())


def test_isic_copy_max_side(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1), size=(40, 20))
    out = tmp_path / "isic"
    prepare.run("isic", src, out, max_side=10)
    assert not (out / "raw").is_symlink() and (out / "raw").is_dir()
    ds = ClassificationDataset(out, out / "split_isic.json", "test")
    assert ds[0][0].shape == (3, 5, 10)  # 40x20 -> longer side 10, aspect kept
    assert Image.open(src / "ISIC2018_Task3_Test_Input" / "ISIC_0000007.jpg").size == (40, 20)


def test_converted_isic_is_what_cilmp_reads(tmp_path):
    # the contract with cilmp.py: it reads data/<name>/<DATASETS[name]["split"]> with ClassificationDataset and
    # warns when the class names differ from the converter's list. Every classification converter must match.
    import cilmp
    for name, d in cilmp.DATASETS.items():
        if name == "demo":
            continue
        folder = d.get("dir", name)   # pneumonia2 is a second split file inside data/pneumonia
        assert folder in prepare.CONVERTERS and d["split"] == f"split_{name}.json"
        assert name in prepare.CLASSNAMES and folder in SOURCES   # the paper's class names, where to download
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    assert prepare.main(["isic", "--src", str(src), "--out", str(tmp_path / "isic")]) == 0
    args = cilmp.parse_args(["--data", "isic", "--data-dir", str(tmp_path / "isic")])
    train, test = cilmp.build_data(args, 16)
    assert train.classnames == prepare.CLASSNAMES["isic"] and (len(train), len(test)) == (7, 7)
    assert train[0][0].shape == (3, 16, 16)


def test_wrong_source_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="ISIC2018_Task3_Training_Input"):
        prepare.run("isic", tmp_path / "empty", tmp_path / "out")
    assert prepare.main(["isic", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: isic:") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="does not exist"):
        prepare.run("kvasir", tmp_path / "nope", tmp_path / "out")
    with pytest.raises(DataError, match="unknown dataset"):
        prepare.run("imagenet", tmp_path / "empty", tmp_path / "out")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    out = tmp_path / "data" / "isic"

    def boom(*a, **k):
        raise KeyboardInterrupt  # e.g. Ctrl-C just before the end

    monkeypatch.setattr(derm, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare.run("isic", src, out)
    assert not out.exists() and list((tmp_path / "data").iterdir()) == []
    # a run killed hard (no cleanup) leaves a hidden partial folder: the next run removes it
    monkeypatch.undo()
    (tmp_path / "data" / ".isic.partial-99999").mkdir()
    prepare.run("isic", src, out)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["isic"]


def test_idempotent_and_force(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    out = tmp_path / "isic"
    first = prepare.run("isic", src, out)
    stamp = (out / "prepare.json").stat().st_mtime_ns
    again = prepare.run("isic", src, out)  # already prepared: nothing rewritten
    assert (out / "prepare.json").stat().st_mtime_ns == stamp and again["counts"] == first["counts"]
    img(src / "ISIC2018_Task3_Training_Input" / "ISIC_0000099.jpg")
    with open(src / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", "a") as f:
        f.write("ISIC_0000099,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n")
    rebuilt = prepare.run("isic", src, out, force=True)
    assert sum(rebuilt["counts"]["train"].values()) == 8
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no prepare.json"):
        prepare.run("isic", src, tmp_path / "other")


def test_isic_bad_ground_truth(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    gt = src / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv"
    write_csv(gt, ["image"] + ISIC_COLS, [["ISIC_0000007"] + ["1.0", "1.0"] + ["0.0"] * 5])
    with pytest.raises(DataError, match="not one-hot"):
        prepare.run("isic", src, tmp_path / "isic")
    write_csv(gt, ["image"] + ISIC_COLS, [["ISIC_0000007"] + ["yes"] + ["0.0"] * 6])
    with pytest.raises(DataError, match="ISIC_0000007, column MEL: expected a number, got 'yes'"):
        prepare.run("isic", src, tmp_path / "isic")
    write_csv(gt, ["image"] + ISIC_COLS, [["ISIC_0000777"] + ["1.0"] + ["0.0"] * 6])
    with pytest.raises(DataError, match="missing, e.g."):
        prepare.run("isic", src, tmp_path / "isic")
    assert not (tmp_path / "isic").exists()


# ---------------------------------------------------------------------------------------------------------
# the other classification datasets


def test_dermamnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 14), ("val", 7), ("test", 7)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).reshape(n, 1).astype(np.uint8)
    (tmp_path / "raw").mkdir()
    np.savez(tmp_path / "raw" / "dermamnist_64.npz", **arrays)  # any size variant
    out = tmp_path / "dermamnist"
    prepare.run("dermamnist", tmp_path / "raw", out)
    ds = ClassificationDataset(out, out / "split_dermamnist.json", "test")
    assert ds.classnames[4] == "melanoma" and len(ds) == 7
    x, y = ds[3]
    assert y == 3
    np.testing.assert_allclose(x.numpy().transpose(1, 2, 0), arrays["test_images"][3] / 255.0, atol=1e-6)
    assert split_counts(out / "split_dermamnist.json", "train")["vascular lesions"] == 2
    np.savez(tmp_path / "raw" / "dermamnist_64.npz", train_images=arrays["train_images"])
    with pytest.raises(DataError, match="missing arrays"):
        prepare.run("dermamnist", tmp_path / "raw", tmp_path / "d2")


def test_derm7pt(tmp_path):
    root = tmp_path / "raw" / "release_v0"
    # Derm7pt's 20 diagnoses, one case each, with the class CILMP's 5-class grouping gives them
    expected = {
        "basal cell carcinoma": "carcinoma", "seborrheic keratosis": "keratosis", "melanoma": "melanoma",
        "melanoma (in situ)": "melanoma", "melanoma (less than 0.76 mm)": "melanoma",
        "melanoma (0.76 to 1.5 mm)": "melanoma", "melanoma (more than 1.5 mm)": "melanoma",
        "melanoma metastasis": "melanoma", "blue nevus": "nevus", "clark nevus": "nevus", "combined nevus": "nevus",
        "congenital nevus": "nevus", "dermal nevus": "nevus", "recurrent nevus": "nevus",
        "reed or spitz nevus": "nevus", "dermatofibroma": "miscellaneous", "lentigo": "miscellaneous",
        "melanosis": "miscellaneous", "miscellaneous": "miscellaneous", "vascular lesion": "miscellaneous"}
    diagnoses = list(expected)
    rows = []
    for i, d in enumerate(diagnoses):
        img(root / "images" / "Aal" / f"A{i:03d}.jpg")
        rows.append([i, d, 3, f"Aal/C{i:03d}.jpg", f"Aal/A{i:03d}.jpg"])
    write_csv(root / "meta" / "meta.csv", ["case_num", "diagnosis", "seven_point_score", "clinic", "derm"], rows)
    write_csv(root / "meta" / "train_indexes.csv", ["indexes"], [[i] for i in range(0, 12)])
    write_csv(root / "meta" / "valid_indexes.csv", ["indexes"], [[i] for i in range(12, 15)])
    write_csv(root / "meta" / "test_indexes.csv", ["indexes"], [[i] for i in range(15, 20)])
    out = tmp_path / "derm7pt"
    prepare.run("derm7pt", tmp_path / "raw", out)  # --src may be the folder above release_v0
    split = read_split(out / "split_derm7pt.json")
    assert [len(split[s]) for s in ("train", "val", "test")] == [12, 3, 5]
    by_path = {p.rsplit("/", 1)[1]: c for s in split.values() for p, _, c in s}
    assert {f"A{i:03d}.jpg": expected[d] for i, d in enumerate(diagnoses)} == by_path
    assert split["test"][1][0] == "raw/images/Aal/A016.jpg" and split["test"][1][2] == "miscellaneous"  # lentigo
    ds = ClassificationDataset(out, out / "split_derm7pt.json", "val")
    assert ds.classnames == ["carcinoma", "keratosis", "melanoma", "miscellaneous", "nevus"]
    write_csv(root / "meta" / "meta.csv", ["case_num", "diagnosis", "seven_point_score", "clinic", "derm"],
              rows[:19] + [[19, "unicorn nevus", 0, "x", "Aal/A019.jpg"]])
    with pytest.raises(DataError, match="unknown diagnosis 'unicorn nevus'"):
        prepare.run("derm7pt", tmp_path / "raw", tmp_path / "d2")


def test_aptos2019(tmp_path):
    src = tmp_path / "aptos"
    per_class = [10, 5, 4, 3, 3]
    rows = []
    for c, n in enumerate(per_class):
        for k in range(n):
            rows.append([f"id{c}{k:02d}", c])
            img(src / "train_images" / f"id{c}{k:02d}.png")
    write_csv(src / "train.csv", ["id_code", "diagnosis"], rows)
    out = tmp_path / "aptos2019"
    prepare.run("aptos2019", src, out, seed=3)
    # 25 images * 732 / 3662 = 4.997 -> 5 test images, allocated [2, 1, 1, 1, 0] (see test_allocate)
    names = prepare.CLASSNAMES["aptos2019"]
    test = split_counts(out / "split_aptos2019.json", "test")
    assert [test.get(n, 0) for n in names] == [2, 1, 1, 1, 0]
    ds = ClassificationDataset(out, out / "split_aptos2019.json", "train")
    assert len(ds) == 20 and ds.classnames == names
    write_csv(src / "train.csv", ["id_code", "grade"], rows)
    with pytest.raises(DataError, match=r"missing column\(s\) \['diagnosis'\]"):
        prepare.run("aptos2019", src, tmp_path / "a2")


def test_kvasir(tmp_path):
    root = tmp_path / "raw" / "kvasir-dataset-v2"
    for c in prepare.CLASSNAMES["kvasir"]:
        for k in range(10):
            img(root / c.replace(" ", "-") / f"{k:04d}.jpg")
    out = tmp_path / "kvasir"
    prepare.run("kvasir", tmp_path / "raw", out)
    # 80 * 2400 / 8000 = 24 test images, 3 per class (the paper's 700/300 per class)
    assert split_counts(out / "split_kvasir.json", "test") == {c: 3 for c in prepare.CLASSNAMES["kvasir"]}
    assert split_counts(out / "split_kvasir.json", "train") == {c: 7 for c in prepare.CLASSNAMES["kvasir"]}
    assert read_split(out / "split_kvasir.json")["val"] == []
    assert ClassificationDataset(out, out / "split_kvasir.json", "test").classnames[5] == "normal z-line"


def test_pneumonia(tmp_path):
    root = tmp_path / "raw" / "chest_xray"
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for k in range(n):
            img(root / split / "NORMAL" / f"IM-{k:04d}-0001.jpeg")
            img(root / split / "PNEUMONIA" / f"person{k}_bacteria_{k}.jpeg")
            img(root / split / "PNEUMONIA" / f"person{k}_virus_{k + 10}.jpeg")
    out = tmp_path / "pneumonia"
    prepare.run("pneumonia", tmp_path / "raw", out)
    assert split_counts(out / "split_pneumonia.json", "train") == {
        "normal": 3, "bacteria pneumonia": 3, "virus pneumonia": 3}
    assert split_counts(out / "split_pneumonia2.json", "test") == {"normal": 2, "pneumonia": 4}
    ds = ClassificationDataset(out, out / "split_pneumonia.json", "val")
    assert sorted(ds.labels.tolist()) == [0, 1, 2]
    img(root / "train" / "PNEUMONIA" / "person9_unknown_9.jpeg")
    with pytest.raises(DataError, match="neither \\*bacteria\\* nor \\*virus\\*"):
        prepare.run("pneumonia", tmp_path / "raw", tmp_path / "p2")


def test_cpn_x_ray(tmp_path):
    src = tmp_path / "cpn"
    for folder in ("COVID", "Normal", "Pneumonia"):
        for k in range(10):
            img(src / "data" / folder / f"{folder}{k}.png")
    out = tmp_path / "cpn-x-ray"
    prepare.run("cpn-x-ray", src, out)
    # 30 * 1569 / 5228 = 9.003 -> 9 test, 3 per class
    assert split_counts(out / "split_cpn-x-ray.json", "test") == {"normal": 3, "covid": 3, "pneumonia": 3}
    assert ClassificationDataset(out, out / "split_cpn-x-ray.json", "train").classnames == ["normal", "covid",
                                                                                           "pneumonia"]


def test_chaoyang(tmp_path):
    root = tmp_path / "raw" / "chaoyang-data"
    for split, n in (("train", 2), ("test", 1)):
        entries = []
        for c in range(4):
            for k in range(n):
                name = f"{split}/{c}-{k}.JPG"
                img(root / name)
                entries.append({"name": name, "label": c})
        (root / f"{split}.json").write_text(json.dumps(entries))
    out = tmp_path / "chaoyang"
    prepare.run("chaoyang", tmp_path / "raw", out)
    assert split_counts(out / "split_chaoyang.json", "train") == {
        "normal": 2, "serrated": 2, "adenocarcinoma": 2, "adenoma": 2}
    ds = ClassificationDataset(out, out / "split_chaoyang.json", "test")
    assert ds.labels.tolist() == [0, 1, 2, 3] and ds[2][0].shape == (3, 8, 8)


def test_fetal_us(tmp_path):
    root = tmp_path / "raw" / "FETAL_PLANES_ZENODO"
    planes = ["Other", "Maternal cervix", "Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax"]
    rows = []
    for k, plane in enumerate(planes * 2):
        name = f"Patient{k:05d}_Plane1_1_of_1"
        img(root / "Images" / f"{name}.png")
        rows.append([name, k, plane, "Trans-thalamic" if plane == "Fetal brain" else "Not A Brain", "Op. 1",
                     "Voluson E6", 1 if k < 6 else 0])
    # the official CSV is ';'-separated and its last header is "Train " with a trailing space
    write_csv(root / "FETAL_PLANES_DB_data.csv",
              ["Image_name", "Patient_num", "Plane", "Brain_plane", "Operator", "US_Machine", "Train "], rows,
              delimiter=";")
    out = tmp_path / "fetal-us"
    prepare.run("fetal-us", tmp_path / "raw", out)
    ds = ClassificationDataset(out, out / "split_fetal-us.json", "train")
    assert ds.labels.tolist() == [5, 4, 2, 0, 1, 3]  # Other -> "Other planes" (5), cervix 4, abdomen 2, ...
    assert ds.classnames[5] == "Other planes"
    assert len(ClassificationDataset(out, out / "split_fetal-us.json", "test")) == 6


def test_adam_with_and_without_test_set(tmp_path):
    root = tmp_path / "raw" / "ADAM"
    for part in ("Training400", "Validation400"):
        for k in range(2):
            img(root / part / "AMD" / f"A{part[0]}{k:03d}.jpg")
        for k in range(6):
            img(root / part / "Non-AMD" / f"N{part[0]}{k:03d}.jpg")
    out = tmp_path / "adam"
    prepare.run("adam", tmp_path / "raw", out)
    names = prepare.CLASSNAMES["adam"]
    assert split_counts(out / "split_adam.json", "test") == {names[0]: 6, names[1]: 2}
    assert ClassificationDataset(out, out / "split_adam.json", "train").labels.tolist() == [0] * 6 + [1] * 2
    # without the labelled validation set: a seeded 50/50 split of Training400, said in prepare.json
    for p in sorted((root / "Validation400").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "Validation400").rmdir()
    out2 = tmp_path / "adam2"
    summary = prepare.run("adam", tmp_path / "raw", out2)
    assert split_counts(out2 / "split_adam.json", "test") == {names[0]: 3, names[1]: 1}
    assert "50/50" in summary["notes"][0]


def test_odir(tmp_path):
    src = tmp_path / "odir5k"
    rows = []
    for c, letter in enumerate("NDGCAHMO"):
        for k in range(5):
            fname = f"{c * 5 + k}_left.jpg"
            img(src / "preprocessed_images" / fname)
            onehot = [1 if j == c else 0 for j in range(8)]
            rows.append([c * 5 + k, 60, "Male", fname, fname.replace("left", "right"), "x", "y", *onehot,
                         f"../input/{fname}", f"['{letter}']", str(onehot), fname])
    write_csv(src / "full_df.csv", ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
                                    "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *"NDGCAHMO",
                                    "filepath", "labels", "target", "filename"], rows)
    out = tmp_path / "odir"
    prepare.run("odir", src, out)
    # 40 * 1279 / 6392 = 8.004 -> 8 test, 1 per class
    assert split_counts(out / "split_odir.json", "test") == {c: 1 for c in prepare.CLASSNAMES["odir"]}
    ds = ClassificationDataset(out, out / "split_odir.json", "train")
    assert len(ds) == 32 and ds.classnames[4] == "age related macular degeneration"


# ---------------------------------------------------------------------------------------------------------
# chest X-ray pairs and labels


def test_chexpert_5x200(tmp_path, monkeypatch):
    monkeypatch.setattr(chexpert, "CHEXPERT_5X200_N", 2)  # GLoRIA's 200, scaled down for a tiny mock
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_FINDINGS
    rows, eligible = [], {}
    five = prepare.CLASSNAMES["chexpert5x200"]

    def add(findings, frontal=True, nan_others=False):
        k = len(rows)
        path = f"CheXpert-v1.0-small/train/patient{k:05d}/study1/view1_{'frontal' if frontal else 'lateral'}.jpg"
        img(tmp_path / path)
        cells = ["" if nan_others else "0.0"] * len(CHEXPERT_FINDINGS)
        for f, v in findings.items():
            cells[CHEXPERT_FINDINGS.index(f)] = v
        rows.append([path, "Female", 50, "Frontal" if frontal else "Lateral", "AP" if frontal else ""] + cells)
        return path

    for t in five:
        eligible[t] = {add({t: "1.0"}), add({t: "1.0"}, nan_others=True), add({t: "1.0", "No Finding": "1.0"})}
        add({t: "1.0", "Support Devices": "1.0"})  # a second positive: not eligible
        add({t: "1.0", "Edema" if t != "Edema" else "Atelectasis": "-1.0"})  # an uncertain one: not eligible
        add({t: "1.0"}, frontal=False)  # lateral: not eligible
    write_csv(root / "train.csv", header, rows)
    write_csv(root / "valid.csv", header, rows[:3])
    out = tmp_path / "chexpert"
    prepare.run("chexpert", root, out)
    test = MultiLabelDataset(out, out / "chexpert_5x200.csv", findings=five)
    assert len(test) == 10
    for k, t in enumerate(five):  # 5 blocks of 2, each one-hot on its finding, drawn from the eligible rows
        block = test.paths[2 * k: 2 * k + 2]
        assert {p.replace("raw/", "CheXpert-v1.0-small/") for p in block} <= eligible[t]
        assert test.labels[2 * k: 2 * k + 2].tolist() == [[float(j == k) for j in range(5)]] * 2
    train = MultiLabelDataset(out, out / "train.csv", findings=CHEXPERT_FINDINGS)
    assert len(train) == 30 - 10 and not set(train.paths) & set(test.paths)  # held out of training
    assert len(MultiLabelDataset(out, out / "valid.csv")) == 3
    split = ClassificationDataset(out, out / "split_chexpert5x200.json", "test")
    assert split.classnames == five and split.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    monkeypatch.setattr(chexpert, "CHEXPERT_5X200_N", 4)
    with pytest.raises(DataError, match="only 3 frontal images have Atelectasis"):
        prepare.run("chexpert", root, tmp_path / "c2")


def test_cleft_reads_the_files_written_here():
    # the contract with cleft.py: the files its --data chexpert / rsna presets open are the ones the converters
    # write (train.csv, valid.csv, split_chexpert5x200.json; split_rsna.json; see the two tests around this one)
    import cleft
    d = cleft.DATASETS["chexpert"]
    assert (d["dir"], *d["pairs"], d["split"], *d["class_csvs"]) == (
        "chexpert", "train.csv", "valid.csv", "split_chexpert5x200.json", "train.csv", "valid.csv")
    assert (cleft.DATASETS["rsna"]["dir"], cleft.DATASETS["rsna"]["split"]) == ("rsna", "split_rsna.json")


def test_dicom_to_uint8_numbers():
    # 255/400 scaling: 100 -> 63.75 -> 64, 200 -> 127.5 -> 128 (numpy rounds half to even), 400 -> 255
    a = np.array([[0, 100], [200, 400]], np.uint16)
    assert rsna.dicom_to_uint8(a).tolist() == [[0, 64], [128, 255]]
    assert rsna.dicom_to_uint8(a, "MONOCHROME1").tolist() == [[255, 191], [127, 0]]


def test_rsna(tmp_path, monkeypatch):
    src = tmp_path / "rsna"
    (src / "stage_2_train_images").mkdir(parents=True)
    rows = []
    for k in range(20):
        pid = f"{k:04d}-pid"
        positive = k < 6
        rows.append([pid, 10, 20, 30, 40, 1] if positive else [pid, "", "", "", "", 0])
        if k < 2:
            rows.append([pid, 50, 60, 30, 40, 1])  # a second box for the same patient
        # stand-in DICOM (pydicom is not a test dependency): the pixel array saved with numpy
        np.save(src / "stage_2_train_images" / f"{pid}.dcm.npy", np.full((4, 4), 100 + k, np.uint16))
        os.rename(src / "stage_2_train_images" / f"{pid}.dcm.npy", src / "stage_2_train_images" / f"{pid}.dcm")
    write_csv(src / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    monkeypatch.setattr(rsna, "read_dicom", lambda p: (np.load(p), "MONOCHROME2"))
    out = tmp_path / "rsna_out"
    before = snapshot(src)
    prepare.run("rsna", src, out)
    assert snapshot(src) == before
    # 20 patients (6 positive): 30% = 6 held out as [4 normal, 2 pneumonia], halved into val [2, 1], test [2, 1]
    assert split_counts(out / "split_rsna.json", "train") == {"normal": 10, "pneumonia": 4}
    assert split_counts(out / "split_rsna.json", "val") == {"normal": 2, "pneumonia": 1}
    assert split_counts(out / "split_rsna.json", "test") == {"normal": 2, "pneumonia": 1}
    ds = ClassificationDataset(out, out / "split_rsna.json", "train")
    x, _ = ds[0]
    assert float(x.max()) == 1.0  # a uniform image scales to 255
    ml = MultiLabelDataset(out, out / "test.csv")
    assert ml.findings == ["Pneumonia"] and ml.labels.sum() == 1
    assert sorted(p.name for p in (out / "images").iterdir())[:2] == ["0000-pid.png", "0001-pid.png"]


def test_rsna_without_pydicom(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # `import pydicom` now fails
    with pytest.raises(DataError, match="pip install pydicom"):
        rsna.read_dicom(tmp_path / "x.dcm")


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough

 FINDINGS:
 
 The lungs are clear.  No effusion.
 
 IMPRESSION:
 
 No acute process.
"""


def test_report_sections():
    sec = mimic.report_sections(MIMIC_REPORT)
    assert sec["FINDINGS"] == "The lungs are clear. No effusion."
    assert sec["IMPRESSION"] == "No acute process."
    assert sec["INDICATION"] == "___ with cough"


def test_mimic_cxr(tmp_path):
    src = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    meta, split, chex = [], [], []

    def study(subj, st, date, views, report=MIMIC_REPORT, which="train", on_disk=True):
        for dicom, view in views:
            meta.append([dicom, subj, st, "", view, 8, 8, date, "101010.5", "", "", ""])
            split.append([dicom, st, subj, which])
            if on_disk:
                img(src / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{st}" / f"{dicom}.jpg")
        chex.append([subj, st] + ["1.0" if f == "Edema" else "" for f in CHEXPERT_FINDINGS])
        if report is not None:
            p = src / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{st}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(report)

    a = "10000032"
    study(a, "50000003", "21800506", [("d3pa", "PA"), ("d3ll", "LL")])
    study(a, "50000001", "21800101", [("d1pa", "PA"), ("d1lat", "LATERAL"), ("d1ap", "AP")])
    study(a, "50000002", "21800301", [("d2ap", "AP")], report=" IMPRESSION: Stable.\n")
    study(a, "50000004", "21800601", [("d4pa", "PA")], report=None)  # no report: skipped, still a "previous"
    b = "11000011"
    study(b, "50000010", "21900101", [("e1pa", "PA")], which="test")
    study(b, "50000011", "21900102", [("e2pa", "PA")], which="test", on_disk=False)  # images not downloaded
    write_csv(src / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta)
    write_csv(src / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    write_csv(src / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + CHEXPERT_FINDINGS, chex)
    out = tmp_path / "mimic"
    summary = prepare.run("mimic-cxr", src, out)
    assert summary["skipped"] == {"no report file": 1, "no frontal image on disk": 1}
    with open(out / "reports_train.csv") as f:
        rows = {r["study_id"]: r for r in csv.DictReader(f)}
    p = lambda st, d: f"raw/files/p10/p{a}/s{st}/{d}.jpg"
    assert rows["50000001"]["image_path"] == p("50000001", "d1pa")  # PA preferred over AP
    assert rows["50000001"]["auxview_image_path"] == p("50000001", "d1lat")
    assert rows["50000001"]["last_image_path"] == "-1" and rows["50000001"]["last_auxview_image_path"] == "-1"
    assert rows["50000002"]["last_image_path"] == p("50000001", "d1pa")  # previous study by date
    assert rows["50000002"]["last_auxview_image_path"] == p("50000001", "d1lat")
    assert rows["50000002"]["auxview_image_path"] == "-1" and rows["50000002"]["report"] == "Stable."
    assert rows["50000003"]["auxview_image_path"] == p("50000003", "d3ll")
    assert rows["50000003"]["last_image_path"] == p("50000002", "d2ap")
    assert rows["50000003"]["report"] == "The lungs are clear. No effusion. No acute process."
    ds = ImageReportDataset(out, out / "reports_train.csv", multiview=True)
    item = ds[[it["image_path"] for it in ds.items].index(p("50000002", "d2ap"))]
    assert item["has_last"].item() and item["has_last_auxview"].item() and not item["has_auxview"].item()
    assert len(ImageReportDataset(out, out / "reports_test.csv")) == 1
    labels = MultiLabelDataset(out, out / "labels_train.csv")
    assert labels.findings == CHEXPERT_FINDINGS and labels.labels[:, CHEXPERT_FINDINGS.index("Edema")].sum() == 3
    (src / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(DataError, match="mimic-cxr-2.0.0-"):
        prepare.run("mimic-cxr", src, tmp_path / "m2")


# ---------------------------------------------------------------------------------------------------------
# CT-RATE


def make_ct_rate(root, version=2):
    """dataset/{train,valid}[_fixed]/<split>_<p>/<split>_<p>_a/<split>_<p>_a_1.nii.gz + the four CSV folders."""
    ds = root / "dataset"
    rng = np.random.default_rng(0)
    for split, n, meta_name, rep_name, lab_name in (
            ("train", 3, "train_metadata.csv", "train_reports.csv", "train_predicted_labels.csv"),
            ("valid", 1, "validation_metadata.csv", "validation_reports.csv", "valid_predicted_labels.csv")):
        folder = f"{split}_fixed" if version == 2 else split
        meta, reps, labs = [], [], []
        for p in range(1, n + 2):  # one more listed than on disk: a partial download
            name = f"{split}_{p}_a_1.nii.gz"
            if p <= n:
                hu = rng.integers(-1000, 1000, (4, 4, 3)).astype(np.int16)
                stored = hu if version == 2 else (hu + 1024).astype(np.int16)
                write_nifti(ds / folder / f"{split}_{p}" / f"{split}_{p}_a" / name, stored, (0.75, 0.75, 1.5))
            meta.append([name, "SIEMENS", "1", "-1024", "[0.75, 0.75]", "1.5"])
            reps.append([name, "Not given.", "Non-contrast.", f"Findings {p}.", f"Impression {p}."])
            labs.append([name] + [str((p + j) % 2) for j in range(18)])
        write_csv(ds / "metadata" / meta_name,
                  ["VolumeName", "Manufacturer", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"], meta)
        write_csv(ds / "radiology_text_reports" / rep_name,
                  ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"], reps)
        write_csv(ds / "multi_abnormality_labels" / lab_name, ["VolumeName"] + ct_rate.CT_RATE_FINDINGS, labs)
    return root


@pytest.mark.parametrize("version", [2, 1])
def test_ct_rate(tmp_path, version):
    src = make_ct_rate(tmp_path / "CT-RATE", version)
    out = tmp_path / "ct-rate"
    summary = prepare.run("ct-rate", src, out)
    assert summary["ct_rate_version"] == version
    assert summary["counts"]["train"]["volumes"] == 3 and summary["skipped"]["train"] == {"volume not on disk": 1}
    ds = CTVolumeDataset(out / "volumes_train", out / "labels_train.csv", out / "reports_train.csv",
                         metadata_csv=out / "metadata.csv", target_shape=(4, 4, 3))
    assert len(ds) == 3 and ds.findings == ct_rate.CT_RATE_FINDINGS
    assert ds.labels[0].tolist() == [float((1 + j) % 2) for j in range(18)]
    raw, spacing, slope, inter = ds.load_hu_input(0)
    # v2 stores HU: no second rescale (slope 1, intercept 0); v1 stores HU + 1024: the metadata's -1024 applies
    assert (slope, inter) == ((1.0, 0.0) if version == 2 else (1.0, -1024.0))
    hu = raw * slope + inter
    truth, _ = read_nifti(src / "dataset" / ("train_fixed" if version == 2 else "train") / "train_1" /
                          "train_1_a" / "train_1_a_1.nii.gz")
    np.testing.assert_array_equal(hu, truth.astype(np.float64) - (0 if version == 2 else 1024))
    assert spacing == (0.75, 0.75, 1.5)
    assert ds[0]["report"] == "Findings 1."
    assert len(CTVolumeDataset(out / "volumes_valid", out / "labels_valid.csv", metadata_csv=out / "metadata.csv",
                               target_shape=(4, 4, 3))) == 1


def test_ct_rate_wrong_source(tmp_path):
    src = make_ct_rate(tmp_path / "CT-RATE")
    (src / "dataset" / "metadata" / "validation_metadata.csv").unlink()
    with pytest.raises(DataError, match="metadata/validation_metadata.csv"):
        prepare.run("ct-rate", src, tmp_path / "out")


def test_registry_and_list(capsys):
    # every registered converter resolves to a documented function with the shared signature; --list shows them all
    import inspect
    for name in prepare.CONVERTERS:
        fn = prepare.converter(name)
        params = inspect.signature(fn).parameters
        assert fn.__doc__ and list(params)[:2] == ["src", "out"] and any(p.kind == p.VAR_KEYWORD
                                                                        for p in params.values()), name
    assert prepare.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(prepare.CONVERTERS)
    assert {"covidx", "siim", "rsna-seg", "chexpert8x200"} <= set(listed)
