"""Tests for the converters Adaptor and ALTA need (covidx, siim, rsna-seg, chexpert8x200), each on a tiny mock of
its official layout, read back through common/data.py. Expected values are worked out by hand in comments (or,
for MGCA's COVIDx validation split, printed by sklearn's train_test_split in the golden environment).
"""
import csv

import numpy as np
import pytest
from PIL import Image

from common import prepare
from common.data import (CHEXPERT_FINDINGS, ClassificationDataset, DataError, MultiLabelDataset, SegmentationDataset,
                         read_seg_split, read_split)
from common.prepare import chexpert, cxr, rsna, siim
from test_prepare import img, snapshot, split_counts, write_csv


def fake_dicom(path, pixels):
    """A stand-in DICOM (pydicom is not a test dependency): the pixel array saved with numpy under a .dcm name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, pixels)


def read_fake_dicom(path):
    return np.load(path), "MONOCHROME2"


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

# ---------------------------------------------------------------------------------------------------------
# SIIM-ACR run-length encoding


def test_siim_rle_is_relative_and_column_major():
    # a 4-wide, 3-high image; foreground (row, col): (1, 0), (2, 0), (0, 1), (2, 3).
    # column-major pixel index = col * 3 + row: 1, 2, 3 and 11. Runs: start 1 length 3, then start 11 = 7 after
    # the end of the first run (1 + 3 = 4), length 1  ->  "1 3 7 1"
    expected = np.zeros((3, 4), bool)
    expected[1, 0] = expected[2, 0] = expected[0, 1] = expected[2, 3] = True
    assert siim.decode_rle("1 3 7 1", width=4, height=3).tolist() == expected.tolist()
    assert siim.encode_rle(expected) == "1 3 7 1"
    # the same numbers read as absolute starts or row-major would be other pixels
    assert siim.decode_rle("0 12", 4, 3).all() and not siim.decode_rle("0 1", 4, 3)[0, 1]
    rng = np.random.default_rng(0)
    for h, w in ((5, 7), (16, 16), (1, 9)):
        m = rng.random((h, w)) < 0.3
        assert np.array_equal(siim.decode_rle(siim.encode_rle(m), w, h), m)
    assert siim.encode_rle(np.zeros((3, 3), bool)) == "-1"
    with pytest.raises(ValueError, match="outside the 4x3 image"):
        siim.decode_rle("10 5", 4, 3)
    with pytest.raises(ValueError, match="odd count"):
        siim.decode_rle("1 3 7", 4, 3)


def make_siim(root, n=20, positive=6):
    """train-rle.csv (" EncodedPixels" header, " -1" cells, as the Kaggle file) + dicom-images-train/<study>/
    <series>/<ImageId>.dcm. Image k is 8 wide x 6 high; positives have a 2x2 block at column k % 6."""
    masks, lines = {}, []
    for k in range(n):
        iid = f"1.2.276.0.{k}"
        fake_dicom(root / "dicom-images-train" / f"1.2.{k}" / f"1.3.{k}" / f"{iid}.dcm",
                   np.full((6, 8), 50 + k, np.uint16))
        m = np.zeros((6, 8), bool)
        if k < positive:
            m[1:3, k % 6:k % 6 + 2] = True
            lines.append([iid, " " + siim.encode_rle(m)])
            if k == 0:  # a second region in another row of the CSV: the mask is the union
                extra = np.zeros((6, 8), bool)
                extra[4:6, 7] = True
                lines.append([iid, " " + siim.encode_rle(extra)])
                m |= extra
            if k == 1:
                lines.append([iid, " -1"])  # contradictory rows: warned, mask rows win
        else:
            lines.append([iid, " -1"])
        masks[iid] = m
    lines.append(["1.2.276.0.999", " -1"])  # listed, but its DICOM was not downloaded
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], lines)
    return masks


def test_siim(tmp_path, monkeypatch):
    src = tmp_path / "siim-acr"
    masks = make_siim(src)
    monkeypatch.setattr(siim, "read_dicom", read_fake_dicom)
    before = snapshot(src)
    out = tmp_path / "siim"
    summary = prepare.run("siim", src, out)
    assert snapshot(src) == before
    # 20 images (6 positive): 30% = 6 held out as [4 negative, 2 positive], halved into val and test
    assert split_counts(out / "split_siim.json", "train") == {"no pneumothorax": 10, "pneumothorax": 4}
    assert split_counts(out / "split_siim.json", "test") == {"no pneumothorax": 2, "pneumothorax": 1}
    assert summary["skipped"] == {"listed in train-rle.csv, no DICOM on disk": 1}
    assert any("both '-1' and a mask row" in w for w in summary["warnings"])
    seg = read_seg_split(out / "split_seg_siim.json")
    cls = read_split(out / "split_siim.json")
    for s in ("train", "val", "test"):  # the same images, in the same order, in both files
        assert [i for i, _ in seg[s]] == [p for p, _, _ in cls[s]]
    ds = SegmentationDataset(out, out / "split_seg_siim.json", "train")
    for k, (image_rel, mask_rel) in enumerate(ds.items):
        iid = image_rel[len("images/"):-len(".png")]
        image, mask = ds[k]
        assert image.shape == (3, 6, 8) and mask_rel == f"masks/{iid}.png"
        assert np.array_equal(mask[0].numpy() == 1, masks[iid]), iid
    assert np.asarray(Image.open(out / "masks" / "1.2.276.0.0.png")).sum() == 255 * (4 + 2)  # the union
    # --max-side: image and mask shrink to the same size, the mask stays 0/255
    prepare.run("siim", src, tmp_path / "small", max_side=4)
    with Image.open(tmp_path / "small" / "images" / "1.2.276.0.0.png") as a, \
            Image.open(tmp_path / "small" / "masks" / "1.2.276.0.0.png") as b:
        assert a.size == b.size == (4, 3) and set(np.unique(np.asarray(b)).tolist()) <= {0, 255}


def test_siim_bad_rle_and_wrong_source(tmp_path, monkeypatch):
    src = tmp_path / "siim-acr"
    make_siim(src, n=4, positive=1)
    monkeypatch.setattr(siim, "read_dicom", read_fake_dicom)
    write_csv(src / "train-rle.csv", ["ImageId", " EncodedPixels"],
              [["1.2.276.0.0", " 40 20"]] + [[f"1.2.276.0.{k}", " -1"] for k in range(1, 4)])
    with pytest.raises(DataError, match=r"ImageId 1\.2\.276\.0\.0: bad EncodedPixels .*outside the 8x6 image"):
        prepare.run("siim", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-rle.csv and dicom-images-train"):
        prepare.run("siim", tmp_path / "empty", tmp_path / "out")

# ---------------------------------------------------------------------------------------------------------
# RSNA boxes -> masks


def make_rsna(src, n=20, positive=6):
    """stage_2_train_labels.csv (one row per box) + stage_2_train_images/<patientId>.dcm, 10 wide x 8 high."""
    lines = []
    for k in range(n):
        pid = f"{k:04d}-pid"
        fake_dicom(src / "stage_2_train_images" / f"{pid}.dcm", np.full((8, 10), 100 + k, np.uint16))
        if k < positive:
            lines.append([pid, "1.0", "2.0", "3.0", "4.0", 1])  # columns 1..3, rows 2..5
            if k < 2:
                lines.append([pid, "6.0", "0.0", "8.0", "2.0", 1])  # a second box, clipped at the right edge
        else:
            lines.append([pid, "", "", "", "", 0])
    write_csv(src / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], lines)


def test_box_mask():
    m = rsna.box_mask([(1.0, 2.0, 3.0, 4.0), (6.0, 0.0, 8.0, 2.0)], height=8, width=10)
    expected = np.zeros((8, 10), bool)
    expected[2:6, 1:4] = True   # x 1..3, y 2..5
    expected[0:2, 6:10] = True  # x 6..13 clipped to 6..9, y 0..1
    assert m.tolist() == expected.tolist()


def test_rsna_seg(tmp_path, monkeypatch):
    src = tmp_path / "rsna"
    make_rsna(src)
    monkeypatch.setattr(rsna, "read_dicom", read_fake_dicom)
    summary = prepare.run("rsna-seg", src, tmp_path / "rsna-seg")
    out = tmp_path / "rsna-seg"
    assert summary["boxes"] == 8 and summary["warnings"] == []
    ds = SegmentationDataset(out, "split_seg_rsna.json", "train")
    by_id = {i[len("images/"):-4]: k for k, (i, _) in enumerate(ds.items)}
    expected = rsna.box_mask([(1, 2, 3, 4), (6, 0, 8, 2)], 8, 10)
    for pid, k in by_id.items():
        image, mask = ds[k]
        assert image.shape == (3, 8, 10) and mask.shape == (1, 8, 10)
        n = int(pid[:4])
        want = expected if n < 2 else rsna.box_mask([(1, 2, 3, 4)], 8, 10) if n < 6 else np.zeros((8, 10), bool)
        assert np.array_equal(mask[0].numpy() == 1, want), pid
    # the same patients per split as the `rsna` classification converter (same seed)
    prepare.run("rsna", src, tmp_path / "rsna-cls")
    for s in ("train", "val", "test"):
        assert [p for p, _, _ in read_split(out / "split_rsna.json")[s]] == \
            [p for p, _, _ in read_split(tmp_path / "rsna-cls" / "split_rsna.json")[s]]
    # a box with no area is refused, naming the patient
    with open(src / "stage_2_train_labels.csv", "a") as f:
        f.write("0003-pid,5.0,5.0,0.0,3.0,1\n")
    with pytest.raises(DataError, match="patientId 0003-pid: box .* has no area"):
        prepare.run("rsna-seg", src, tmp_path / "r2")

# ---------------------------------------------------------------------------------------------------------
# COVIDx


def make_covidx(root, n_train=10, n_test=6):
    classes = ["normal", "pneumonia", "COVID-19"]
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for k in range(n):
            fname = f"{split} {k}.png" if k == 0 else f"{split}{k:03d}.png"  # a file name with a space
            img(root / split / fname)
            lines.append(f"{1000 + k} {fname} {classes[k % 3]} {'rsna' if k % 2 else 'cohen'}")
        (root / f"{split}_COVIDx9A.txt").write_text("\n".join(lines) + "\n")
    return classes


def test_covidx(tmp_path):
    src = tmp_path / "COVIDx"
    classes = make_covidx(src)
    out = tmp_path / "covidx"
    summary = prepare.run("covidx", src, out)
    split = read_split(out / "split_covidx.json")
    # sklearn train_test_split(range(10), train_size=0.8, random_state=0) -> train [4, 9, 1, 6, 7, 3, 0, 5],
    # val [2, 8] (printed by /work/venv-gold's sklearn)
    name = lambda k: "raw/train/train 0.png" if k == 0 else f"raw/train/train{k:03d}.png"
    assert [p for p, _, _ in split["train"]] == [name(k) for k in [4, 9, 1, 6, 7, 3, 0, 5]]
    assert [p for p, _, _ in split["val"]] == [name(k) for k in [2, 8]]
    assert [c for _, _, c in split["val"]] == [classes[2 % 3], classes[8 % 3]]
    assert len(split["test"]) == 6 and split["test"][0][0] == "raw/test/test 0.png"
    ds = ClassificationDataset(out, out / "split_covidx.json", "test")
    assert ds.classnames == ["normal", "pneumonia", "COVID-19"] and ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert summary["warnings"] == []
    # sklearn, range(12): train [10, 2, 8, 1, 7, 9, 3, 0, 5], val [6, 11, 4]
    assert cxr.mgca_train_val(12) == ([10, 2, 8, 1, 7, 9, 3, 0, 5], [6, 11, 4])


def test_covidx_bad_lists(tmp_path):
    src = tmp_path / "COVIDx"
    make_covidx(src)
    lines = (src / "train_COVIDx9A.txt").read_text().splitlines()
    (src / "train_COVIDx9A.txt").write_text("\n".join(lines + [lines[1]]) + "\n")
    summary = prepare.run("covidx", src, tmp_path / "c1")
    assert "listed twice (same class)" in summary["warnings"][0]
    (src / "train_COVIDx9A.txt").write_text("\n".join(lines + [lines[1].replace("pneumonia", "normal")]) + "\n")
    with pytest.raises(DataError, match="listed twice with different classes"):
        prepare.run("covidx", src, tmp_path / "c2")
    (src / "train_COVIDx9A.txt").write_text("1 train001.png positive rsna\n")
    with pytest.raises(DataError, match="binary COVIDx release"):
        prepare.run("covidx", src, tmp_path / "c3")
    (src / "train_COVIDx9A.txt").unlink()
    with pytest.raises(DataError, match="train_COVIDx9A.txt and test_COVIDx9A.txt"):
        prepare.run("covidx", src, tmp_path / "c4")
    (src / "labels").mkdir()  # the lists as COVID-Net's repository keeps them, in labels/
    (src / "labels" / "train_COVIDx9A.txt").write_text("\n".join(lines) + "\n")
    (src / "test_COVIDx9A.txt").rename(src / "labels" / "test_COVIDx9A.txt")
    prepare.run("covidx", src, tmp_path / "c5")
    assert [len(v) for v in read_split(tmp_path / "c5" / "split_covidx.json").values()] == [8, 2, 6]

# ---------------------------------------------------------------------------------------------------------
# CheXpert 8x200 (ConVIRT's retrieval sets)

EIGHT = ["No Finding", "Cardiomegaly", "Edema", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
         "Fracture"]
META = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]


def make_8x200(root, per_class=2, folder="CheXpert-v1.0-small"):
    """ConVIRT's four files (git clone into convirt/) + the CheXpert images they name."""
    cand = []
    for c, cls in enumerate(EIGHT):
        for k in range(per_class):
            path = f"CheXpert-v1.0-small/train/patient{c}{k:04d}/study1/view1_frontal.jpg"
            img(root / folder / path.split("/", 1)[1])
            cand.append([path, "Male", 60, "Frontal", "AP"] + ["1.0" if f == cls else "0.0" for f in CHEXPERT_FINDINGS])
    queries = []
    for c, cls in enumerate(EIGHT):
        path = f"CheXpert-v1.0-small/train/patient9{c}/study2/view1_frontal.jpg"
        img(root / folder / path.split("/", 1)[1])
        queries.append([cls, path])
    texts = [[cls, f"There is {cls.lower()}."] for cls in EIGHT]
    for d in ("image-retrieval", "text-retrieval"):
        write_csv(root / "convirt" / d / "candidate.csv", META + CHEXPERT_FINDINGS, cand)
    write_csv(root / "convirt" / "image-retrieval" / "query.csv", ["Variable", "Path"], queries)
    write_csv(root / "convirt" / "text-retrieval" / "query.csv", ["Variable", "Text"], texts)
    return cand, queries, texts


@pytest.mark.parametrize("folder", ["CheXpert-v1.0-small", "CheXpert-v1.0"])
def test_chexpert8x200(tmp_path, monkeypatch, folder):
    monkeypatch.setattr(chexpert, "CHEXPERT_8X200_N", 2)
    src = tmp_path / "chexpert"
    cand, queries, texts = make_8x200(src, folder=folder)
    out = tmp_path / "chexpert8x200"
    summary = prepare.run("chexpert8x200", src, out)
    assert summary["warnings"] == [] and summary["counts"]["image_queries"] == {c: 1 for c in EIGHT}
    # ConVIRT's files, same columns, Path re-rooted at raw/ (relative to the output folder)
    c_rows = rows(out / "image-retrieval" / "candidate.csv")
    assert list(c_rows[0]) == META + CHEXPERT_FINDINGS and len(c_rows) == 16
    assert c_rows[0]["Path"] == f"raw/{folder}/train/patient00000/study1/view1_frontal.jpg"
    assert (out / c_rows[0]["Path"]).is_file()
    assert rows(out / "text-retrieval" / "candidate.csv") == c_rows
    q_rows = rows(out / "image-retrieval" / "query.csv")
    assert list(q_rows[0]) == ["Variable", "Path"] and [r["Variable"] for r in q_rows] == EIGHT
    assert rows(out / "text-retrieval" / "query.csv") == [{"Variable": v, "Text": t} for v, t in texts]
    # what ALTA's evaluation computes from candidate.csv: the column index (among the 14) of the single 1
    alta_ids = [[float(r[f]) for f in CHEXPERT_FINDINGS].index(1.0) for r in c_rows]
    assert sorted(set(alta_ids)) == [0, 2, 5, 7, 8, 9, 10, 12]
    # our split files: the candidates and the query images, labels in EIGHT order (the same classes)
    cands = ClassificationDataset(out, out / "split_chexpert8x200.json", "test")
    assert cands.classnames == EIGHT and len(cands) == 16
    assert [CHEXPERT_FINDINGS.index(EIGHT[y]) for y in cands.labels] == alta_ids
    qs = ClassificationDataset(out, out / "split_chexpert8x200_query.json", "test")
    assert qs.labels.tolist() == list(range(8)) and qs[0][0].shape == (3, 8, 8)
    ml = MultiLabelDataset(out, out / "image-retrieval" / "candidate.csv", findings=EIGHT)
    assert ml.labels.sum(1).tolist() == [1.0] * 16


def test_chexpert8x200_bad_sets(tmp_path, monkeypatch):
    monkeypatch.setattr(chexpert, "CHEXPERT_8X200_N", 2)
    src = tmp_path / "chexpert"
    cand, queries, texts = make_8x200(src)
    two = list(cand[0])
    two[5 + CHEXPERT_FINDINGS.index("Support Devices")] = "1.0"
    write_csv(src / "convirt" / "image-retrieval" / "candidate.csv", META + CHEXPERT_FINDINGS, [two] + cand[1:])
    with pytest.raises(DataError, match=r"positive finding\(s\) \['No Finding', 'Support Devices'\]"):
        prepare.run("chexpert8x200", src, tmp_path / "o1")
    write_csv(src / "convirt" / "image-retrieval" / "candidate.csv", META + CHEXPERT_FINDINGS, cand)
    write_csv(src / "convirt" / "text-retrieval" / "query.csv", ["Variable", "Text"], texts + [["Unicorn", "x"]])
    with pytest.raises(DataError, match=r"Variable \['Unicorn'\]"):
        prepare.run("chexpert8x200", src, tmp_path / "o2")
    write_csv(src / "convirt" / "text-retrieval" / "query.csv", ["Variable", "Text"], texts)
    monkeypatch.setattr(chexpert, "CHEXPERT_8X200_N", 200)
    assert "not 200 each" in prepare.run("chexpert8x200", src, tmp_path / "o3")["warnings"][0]
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="git clone https://github.com/yuhaozhang/convirt"):
        prepare.run("chexpert8x200", tmp_path / "bare", tmp_path / "o4")
