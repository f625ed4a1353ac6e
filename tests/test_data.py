"""
Tests for common/data.py: every reader round-trips tiny files written here, every user mistake gives a DataError
naming the file and the problem, and make_loader batches, is seeded, and uses a DistributedSampler under a
(single-process gloo) torch.distributed group.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, SequentialSampler

from common.data import (CHEXPERT_FINDINGS, _seed_worker, CaptionDataset, ClassificationDataset, DataError,
                         ImageReportDataset, JointResize, MultiLabelDataset, OneOfClassesDataset, SegmentationDataset,
                         REPO_ROOT, Images, bpe_tokenizer, caption_from_labels, classification_sets,
                         classnames_from_split, clean_caption, dataset_root, fraction, fraction_of, load_image,
                         make_loader, missing_dataset, read_csv, read_pairs, read_seg_split, read_split, right_padded,
                         set_epoch, stratified_subset, train_test_sets, val_split_name)
from common.transforms import eval_transform


def write_png(path, value, size=(6, 4), mode="RGB"):
    """A small image whose pixels encode `value`, so a test can tell which file was loaded. Returns its array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x + value) % 256, (y + 2 * value) % 256, np.full_like(x, value % 256)], -1).astype(np.uint8)
    if mode == "L":
        a = a[:, :, 0]
    Image.fromarray(a).save(path)
    return a


def write_split(path, obj):
    path.write_text(json.dumps(obj))
    return path


def as_chw(a):
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1], what ToTensor must give."""
    return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255.0)


SPLIT = {
    "train": [["img/a.png", 0, "melanoma"], ["img/b.png", 2, "nevus"], ["img/c.png", 0, "melanoma"]],
    "val": [["img/d.png", 1, "keratosis"]],
    "test": [["img/e.png", 2, "nevus"], ["img/f.png", 1, "keratosis"]],
}


@pytest.fixture
def cls_dir(tmp_path):
    arrays = {}
    for i, name in enumerate("abcdef"):
        arrays[f"img/{name}.png"] = write_png(tmp_path / "img" / f"{name}.png", 10 * i)
    write_split(tmp_path / "split.json", SPLIT)
    return tmp_path, arrays


def assert_data_error(fn, *needles):
    """fn() must raise DataError whose message contains every needle (file name, problem)."""
    with pytest.raises(DataError) as e:
        fn()
    for n in needles:
        assert str(n) in str(e.value), f"{n!r} not in {str(e.value)!r}"
    return str(e.value)


# -----------------------------------------------------------------------------
# classification split JSON


def test_read_split_round_trip(cls_dir):
    root, _ = cls_dir
    split = read_split(root / "split.json")
    assert split["train"] == [("img/a.png", 0, "melanoma"), ("img/b.png", 2, "nevus"), ("img/c.png", 0, "melanoma")]
    assert split["val"] == [("img/d.png", 1, "keratosis")]
    assert classnames_from_split(split) == ["melanoma", "keratosis", "nevus"]  # ordered by label
    assert val_split_name(split) == "val"


def test_missing_val_falls_back_to_test(tmp_path):
    p = write_split(tmp_path / "s.json", {"train": SPLIT["train"], "test": SPLIT["test"]})
    split = read_split(p)
    assert split["val"] == [] and val_split_name(split) == "test"
    write_png(tmp_path / "img/a.png", 0)
    msg = assert_data_error(lambda: ClassificationDataset(tmp_path, p, "val"), p, "'val' is empty", "split='test'")
    assert "test" in msg


def test_classification_dataset_items(cls_dir):
    root, arrays = cls_dir
    ds = ClassificationDataset(root, root / "split.json", "test")
    assert len(ds) == 2 and ds.classnames == ["melanoma", "keratosis", "nevus"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [2, 1]
    x, y = ds[1]
    assert y == 1 and torch.equal(x, as_chw(arrays["img/f.png"]))  # PNG is lossless: exact pixels
    # root=None: relpaths are relative to the JSON's folder; split file relative to root is found too
    ds2 = ClassificationDataset(None, root / "split.json", "train")
    assert torch.equal(ds2[1][0], as_chw(arrays["img/b.png"])) and ds2[1][1] == 2
    ds3 = ClassificationDataset(root, "split.json", "train", transform=eval_transform(4))
    assert ds3[0][0].shape == (3, 4, 4)


def test_classification_dataset_grayscale_becomes_rgb(tmp_path):
    a = write_png(tmp_path / "g.png", 30, mode="L")
    p = write_split(tmp_path / "s.json", {"train": [["g.png", 0, "x"]], "test": [["g.png", 0, "x"]]})
    x, _ = ClassificationDataset(tmp_path, p, "train")[0]
    assert x.shape == (3, 4, 6)
    assert torch.equal(x[0], x[2]) and torch.equal(x[0], torch.from_numpy(a.astype(np.float32) / 255.0))


@pytest.mark.parametrize("obj,needles", [
    ([["a.png", 0, "x"]], ["expected a JSON object"]),
    ({"training": []}, ["unknown key", "training", "'train', 'val', 'test'"]),
    ({"train": {"a": 1}}, ['"train" must be a list']),
    ({"train": [["a.png", "0", "x"]]}, ["train[0]", "label (int)"]),
    ({"train": [["a.png", 0]]}, ["train[0]"]),
    ({"train": [], "test": []}, ["all splits are empty"]),
    ({"train": [["a.png", 0, "x"], ["b.png", 0, "y"]]}, ["label 0", "'x'", "'y'", "train[1]"]),
    ({"train": [["a.png", 0, "x"], ["b.png", 2, "z"]]}, ["0..C-1", "missing [1]"]),
    ({"train": [["a.png", -1, "x"], ["b.png", 0, "z"]]}, ["0..C-1", "negative [-1]"]),
])
def test_read_split_errors(tmp_path, obj, needles):
    p = write_split(tmp_path / "bad.json", obj)
    assert_data_error(lambda: read_split(p), p, *needles)


def test_read_split_missing_and_malformed(tmp_path):
    assert_data_error(lambda: read_split(tmp_path / "nope.json"), tmp_path / "nope.json", "not found")
    p = tmp_path / "broken.json"
    p.write_text('{"train": [\n ["a.png", 0, "x"],\n}')
    assert_data_error(lambda: read_split(p), p, "malformed JSON", "line 3")
    assert_data_error(lambda: ClassificationDataset(tmp_path, "nope.json"), "nope.json", "not found")


def test_classification_dataset_bad_split_and_images(cls_dir):
    root, _ = cls_dir
    p = root / "split.json"
    assert_data_error(lambda: ClassificationDataset(root, p, "valid"), p, "unknown split 'valid'")
    # wrong root: caught at construction from the first image
    assert_data_error(lambda: ClassificationDataset(root / "img", p, "train"), p, "first image not found",
                      root / "img" / "img" / "a.png")
    # a later image that is missing or not an image: caught when loaded, naming the image
    (root / "img" / "e.png").write_bytes(b"this is not a png")
    (root / "img" / "f.png").unlink()
    ds = ClassificationDataset(root, p, "test")
    assert_data_error(lambda: ds[0], root / "img" / "e.png", "cannot read image")
    assert_data_error(lambda: ds[1], root / "img" / "f.png", "image not found")


def test_load_image_16bit_and_truncated(tmp_path):
    a16 = np.array([[0, 257 * 100], [65535, 257 * 3]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "x16.png")
    img = load_image(tmp_path / "x16.png")
    assert img.mode == "RGB"
    # full 16-bit range mapped to 8 bits (PIL's own convert would clip all of these to 255)
    assert np.asarray(img)[:, :, 0].tolist() == [[0, 100], [255, 3]]
    write_png(tmp_path / "ok.png", 5, size=(64, 64))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_data_error(lambda: load_image(tmp_path / "cut.png"), tmp_path / "cut.png", "cannot read image")


# -----------------------------------------------------------------------------
# image-report CSV


REPORT_CSV = (
    "image_path,report,auxview_image_path,last_image_path,last_auxview_image_path\n"
    'img/a.png,"Heart size normal, lungs clear.",img/b.png,img/c.png,-1\n'
    'img/d.png,"Mild cardiomegaly.\nNo edema.",-1,,\n'
)


def test_image_report_round_trip(cls_dir):
    root, arrays = cls_dir
    (root / "reports.csv").write_text(REPORT_CSV)
    ds = ImageReportDataset(root, root / "reports.csv")
    assert len(ds) == 2 and ds.reports == ["Heart size normal, lungs clear.", "Mild cardiomegaly.\nNo edema."]
    item = ds[0]
    assert set(item) == {"image", "report"} and torch.equal(item["image"], as_chw(arrays["img/a.png"]))

    mv = ImageReportDataset(None, root / "reports.csv", multiview=True)
    a, b = mv[0], mv[1]
    assert torch.equal(a["auxview"], as_chw(arrays["img/b.png"]))
    assert torch.equal(a["last_image"], as_chw(arrays["img/c.png"]))
    assert a["last_auxview"].shape == a["image"].shape and a["last_auxview"].abs().sum() == 0
    assert [a[k].item() for k in ("has_auxview", "has_last", "has_last_auxview")] == [True, True, False]
    assert [b[k].item() for k in ("has_auxview", "has_last", "has_last_auxview")] == [False, False, False]
    assert a["has_auxview"].dtype == torch.bool
    assert torch.equal(b["image"], as_chw(arrays["img/d.png"])) and b["auxview"].abs().sum() == 0
    # batches stack, with the flags as (B,) bool tensors
    batch = next(iter(make_loader(mv, batch_size=2, shuffle=False)))
    assert batch["image"].shape == (2, 3, 4, 6) and batch["has_last"].tolist() == [True, False]
    assert batch["report"][1] == "Mild cardiomegaly.\nNo edema."


def test_image_report_without_view_columns(cls_dir):
    root, _ = cls_dir
    (root / "r.csv").write_text("report,image_path\nok,img/a.png\n")  # column order does not matter
    item = ImageReportDataset(root, "r.csv", multiview=True)[0]
    assert item["report"] == "ok" and item["has_auxview"].item() is False and item["last_image"].abs().sum() == 0


@pytest.mark.parametrize("text,needles", [
    ("image,text\nimg/a.png,x\n", ["missing column(s) ['image_path', 'report']", "expected columns"]),
    ("", ["empty (no header row)", "image_path"]),
    ("image_path,report\n", ["no data rows"]),
    ("image_path,report\nimg/a.png,ok\nimg/b.png,a,b\n", ["line 3 has 3 fields", "header has 2"]),
    ("image_path,report\n-1,ok\n", ["line 2", "image_path is empty or -1"]),
])
def test_image_report_errors(cls_dir, text, needles):
    root, _ = cls_dir
    p = root / "bad.csv"
    p.write_text(text)
    assert_data_error(lambda: ImageReportDataset(root, p), p, *needles)


def test_image_report_missing_csv_and_image(cls_dir):
    root, _ = cls_dir
    assert_data_error(lambda: ImageReportDataset(root, "nope.csv"), "nope.csv", "not found")
    p = root / "r.csv"
    p.write_text("image_path,report\nimg/zzz.png,x\n")
    assert_data_error(lambda: ImageReportDataset(root, p), p, "first image not found", "zzz.png")
    p.write_text("image_path,report,auxview_image_path\nimg/a.png,x,img/zzz.png\n")
    ds = ImageReportDataset(root, p, multiview=True)
    assert_data_error(lambda: ds[0], root / "img" / "zzz.png", "image not found")


# -----------------------------------------------------------------------------
# multi-label CSV


ML_CSV = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion\n"
    "img/a.png,Female,68,Frontal,AP,1.0,,,0.0\n"
    "img/b.png,Male,87,Frontal,AP,,-1.0,1.0,1.0\n"
    "img/c.png,Male,40,Lateral,,0,-1,0,1\n"
)


@pytest.mark.parametrize("uncertain,blank,labels,mask", [
    ("zero", "zero",
     [[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]),
    ("one", "zero",
     [[1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1]], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]),
    ("ignore", "zero",
     [[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], [[1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]]),
    ("zero", "ignore",
     [[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], [[1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]]),
])
def test_multilabel_policies(cls_dir, uncertain, blank, labels, mask):
    root, arrays = cls_dir
    (root / "f.csv").write_text(ML_CSV)
    ds = MultiLabelDataset(root, root / "f.csv", uncertain=uncertain, blank=blank)
    # findings=None: every column but Path and the metadata columns, in file order
    assert ds.findings == ["No Finding", "Cardiomegaly", "Edema", "Pleural Effusion"]
    assert ds.labels.tolist() == labels and ds.mask.tolist() == mask
    x, y, m = ds[1]
    assert torch.equal(x, as_chw(arrays["img/b.png"]))
    assert y.dtype == torch.float32 and m.dtype == torch.float32 and y.shape == (4,)
    assert y.tolist() == labels[1] and m.tolist() == mask[1]


def test_multilabel_explicit_findings_and_captions(cls_dir):
    root, _ = cls_dir
    (root / "f.csv").write_text(ML_CSV)
    ds = MultiLabelDataset(root, "f.csv", findings=["Edema", "Cardiomegaly"], uncertain="one")
    assert ds.labels.tolist() == [[0, 0], [1, 1], [0, 1]]
    assert ds.caption(1) == "this is a chest x ray of a patient with edema, cardiomegaly"
    assert ds.caption(0) == "this is a chest x ray of a patient with no findings"
    assert caption_from_labels(torch.tensor([1.0, -1.0, 0.0]), ["Edema", "Fracture", "Lung Lesion"]) == \
        "this is a chest x ray of a patient with edema"
    assert caption_from_labels([0, 1], ["A B", "Pleural Effusion"], prefix="xray: ") == "xray: pleural effusion"
    with pytest.raises(ValueError):
        caption_from_labels([1, 0], ["Edema"])


def test_chexpert_findings():
    assert len(CHEXPERT_FINDINGS) == 14 and len(set(CHEXPERT_FINDINGS)) == 14
    assert CHEXPERT_FINDINGS[0] == "No Finding" and CHEXPERT_FINDINGS[-1] == "Support Devices"
    assert CHEXPERT_FINDINGS[10] == "Pleural Effusion"


@pytest.mark.parametrize("text,kwargs,needles", [
    ("Path,Edema\nimg/a.png,2\n", {}, ["line 2", "'Edema'", "'2'", "not 1, 0, -1 or blank"]),
    ("Path,Study\nimg/a.png,study1\n", {}, ["'Study'", "pass findings="]),
    ("Path,Edema\nimg/a.png,1\n", {"findings": ["Edema", "Fracture"]},
     ["missing column(s) ['Fracture']", "expected columns ['Path', 'Edema', 'Fracture']"]),
    ("Image,Edema\nimg/a.png,1\n", {}, ["missing column(s) ['Path']"]),
    ("Path,Sex,AP/PA\nimg/a.png,Male,PA\n", {}, ["no finding columns"]),
    ("Path,Edema\n,1\n", {}, ["line 2", "Path is empty"]),
])
def test_multilabel_errors(cls_dir, text, kwargs, needles):
    root, _ = cls_dir
    p = root / "bad.csv"
    p.write_text(text)
    assert_data_error(lambda: MultiLabelDataset(root, p, **kwargs), p, *needles)
    with pytest.raises(ValueError, match="uncertain"):
        MultiLabelDataset(root, p, uncertain="maybe")


def test_csv_with_bom_and_non_utf8(cls_dir):
    root, _ = cls_dir
    p = root / "bom.csv"
    p.write_bytes("\ufeffPath,Edema\nimg/a.png,1\n".encode("utf-8"))  # Excel-style BOM before "Path"
    assert MultiLabelDataset(root, p).labels.tolist() == [[1.0]]
    p.write_bytes(b"Path,Edema\nimg/\xff\xfe.png,1\n")
    assert_data_error(lambda: MultiLabelDataset(root, p), p, "not a UTF-8 text file")


# -----------------------------------------------------------------------------
# views: caption pairs, single-positive rows, a fixed fraction

CXR = "this is a chest x ray of a patient with "


def test_caption_dataset_from_reports_or_labels_and_frontal_views(cls_dir):
    root, arrays = cls_dir
    (root / "f.csv").write_text(ML_CSV)
    assert MultiLabelDataset(root, "f.csv").frontal.tolist() == [True, True, False]  # c has no AP/PA: lateral
    ds = CaptionDataset(root, "f.csv", findings=None)  # uncertain and blank are negatives
    assert ds.captions == [CXR + "no finding", CXR + "edema, pleural effusion", CXR + "pleural effusion"]
    x, caption = ds[2]
    assert torch.equal(x, as_chw(arrays["img/c.png"])) and caption == CXR + "pleural effusion"
    frontal = CaptionDataset(root, "f.csv", findings=None, frontal_only=True)
    assert frontal.rows.tolist() == [0, 1] and torch.equal(frontal[1][0], as_chw(arrays["img/b.png"]))
    (root / "nocol.csv").write_text("Path,Edema\nimg/a.png,1\n")  # no AP/PA column: every row counts as frontal
    assert len(CaptionDataset(root, "nocol.csv", findings=None, frontal_only=True)) == 1
    (root / "lat.csv").write_text("Path,AP/PA,Edema\nimg/a.png,,1\n")
    assert_data_error(lambda: CaptionDataset(root, "lat.csv", findings=None, frontal_only=True), "no frontal")
    (root / "r.csv").write_text("image_path,report\nimg/d.png,Heart normal.\nimg/a.png,Small effusion.\n")
    reports = CaptionDataset(root, "r.csv", frontal_only=True)  # reports: no views to filter
    assert reports.captions == ["Heart normal.", "Small effusion."]
    assert torch.equal(reports[0][0], as_chw(arrays["img/d.png"])) and reports[1][1] == "Small effusion."


def test_one_of_classes_keeps_single_positive_rows(cls_dir):
    root, arrays = cls_dir
    (root / "f.csv").write_text(ML_CSV)
    names = ["Edema", "Pleural Effusion", "No Finding"]
    ds = OneOfClassesDataset(root, "f.csv", names)  # b has two positives among them: left out
    assert ds.rows.tolist() == [0, 2] and ds.labels.tolist() == [2, 1] and ds.classnames == names
    x, y = ds[1]
    assert torch.equal(x, as_chw(arrays["img/c.png"])) and y == 1
    assert OneOfClassesDataset(root, "f.csv", names, frontal_only=True).rows.tolist() == [0]
    assert_data_error(lambda: OneOfClassesDataset(root, "f.csv", ["Cardiomegaly"]), "f.csv", "exactly one positive")


def test_fraction_of_is_a_fixed_subset_that_keeps_its_labels():
    class Labelled(Dataset):
        labels, classnames = np.arange(10) % 3, ["a", "b", "c"]

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return i, int(self.labels[i])

    sub = fraction_of(Labelled(), 0.3)
    items = [sub[j][0] for j in range(len(sub))]
    assert len(items) == 3 and len(set(items)) == 3 and items == [fraction_of(Labelled(), 0.3)[j][0] for j in range(3)]
    assert sub.labels.tolist() == [i % 3 for i in items] and sub.classnames == ["a", "b", "c"]
    assert items == np.random.RandomState(42).permutation(10)[:3].tolist()  # the documented draw
    assert len(fraction_of(Labelled(), 0.01)) == 1 and sorted(fraction_of(Labelled(), 1.0).indices) == list(range(10))


def test_classification_sets_from_a_split_or_from_single_positive_csv_rows(cls_dir):
    root, arrays = cls_dir
    train, val, test = classification_sets(root, root / "split.json")
    assert (len(train), len(val), len(test)) == (3, 1, 2) and test.classnames == ["melanoma", "keratosis", "nevus"]
    assert torch.equal(val[0][0], as_chw(arrays["img/d.png"])) and test.labels.tolist() == [2, 1]
    no_val = write_split(root / "noval.json", {"train": SPLIT["train"], "test": SPLIT["test"]})
    assert classification_sets(root, no_val)[1].split == "test"  # CoOp: validate on test when val is empty
    sub = classification_sets(root, root / "split.json", frac=0.5, seed=42)[0]
    assert len(sub) == 2 and sub.labels.tolist() == train.labels[np.random.RandomState(42).permutation(3)[:2]].tolist()
    assert_data_error(lambda: classification_sets(root, root / "split.json", n_classes=5), "split.json",
                      "5 classes expected", "has 3")
    (root / "f.csv").write_text(ML_CSV)
    names = ["Edema", "Pleural Effusion", "No Finding"]
    five = write_split(root / "five.json", {"test": [["img/e.png", 0, names[0]], ["img/f.png", 1, names[1]],
                                                     ["img/a.png", 2, names[2]]]})
    train, val, test = classification_sets(root, five, class_csvs=[root / "f.csv", root / "f.csv"])
    assert train.rows.tolist() == [0, 2] and train.labels.tolist() == [2, 1] and train.classnames == names
    assert len(val) == 2 and len(test) == 3
    frontal = classification_sets(root, five, class_csvs=[root / "f.csv", root / "f.csv"], frontal_only=True)[0]
    assert frontal.rows.tolist() == [0]


def test_dataset_root_and_the_missing_dataset_message(tmp_path):
    entry = {"dir": "chexpert", "split": "split_chexpert5x200.json", "get": "CheXpert v1.0 (example.org)"}
    assert dataset_root("chexpert5x200", entry) == REPO_ROOT / "data" / "chexpert"
    assert dataset_root("isic", {"split": "s.json"}) == REPO_ROOT / "data" / "isic"
    assert dataset_root("isic", entry, tmp_path) == tmp_path
    msg = missing_dataset("chexpert5x200", entry, tmp_path)
    assert str(tmp_path / "split_chexpert5x200.json") in msg and "download: CheXpert v1.0 (example.org)" in msg
    assert "python -m common.prepare chexpert --src" in msg and "section 'chexpert'" in msg
    assert str(tmp_path / "train.csv") in missing_dataset("chexpert", entry, tmp_path, "train.csv")
    (tmp_path / "train.csv").write_text("Path\n")
    assert missing_dataset("chexpert", entry, tmp_path, "train.csv") is None
    from common.data import dataset_file
    assert dataset_file("chexpert", entry, tmp_path, "train.csv") == tmp_path / "train.csv"
    with pytest.raises(DataError, match="download: CheXpert v1.0"):   # the split file is not there
        dataset_file("chexpert5x200", entry, tmp_path)


def test_stratified_subset_keeps_a_ratio_of_every_class():
    labels = np.array([0] * 10 + [1] * 20 + [2] * 3)
    keep = stratified_subset(labels, 0.1, seed=1)
    assert np.bincount(labels[keep]).tolist() == [1, 2, 1]  # round(0.3) -> at least one
    assert keep.tolist() == sorted(keep.tolist()) and len(set(keep.tolist())) == len(keep)
    assert keep.tolist() == stratified_subset(labels, 0.1, seed=1).tolist()
    assert keep.tolist() != stratified_subset(labels, 0.1, seed=2).tolist()
    assert stratified_subset(labels, 1.0, seed=0).tolist() == list(range(len(labels)))


def test_train_test_sets_label_ratio_and_class_name_note(cls_dir):
    root, _ = cls_dir
    notes = []
    entry = {"split": "split.json", "get": "x", "classes": ["melanoma", "keratosis", "nevus"]}
    train, test = train_test_sets("isic", entry, root, None, None, log=notes.append)
    assert (len(train), len(test)) == (3, 2) and not notes
    train, _ = train_test_sets("isic", entry | {"classes": ["a", "b", "c"]}, root, None, None, label_ratio=0.5,
                               seed=0, log=notes.append)
    assert train.labels.tolist() == [0, 2] and len(train.items) == 2  # one per class: round(0.5 * 2) and 1 of 1
    assert "label ratio 0.5: 2 training images" in notes[0] and "differ from the paper's" in notes[1]
    assert_data_error(lambda: train_test_sets("isic", entry | {"split": "none.json"}, root, None, None),
                      "dataset 'isic' not found", "none.json", "common.prepare isic")
    # without "classes" / "get" the entry falls back on the converter's class names and common.data.SOURCES
    train_test_sets("isic", {"split": "split.json"}, root, None, None, log=notes.append)
    assert "differ from the paper's" in notes[-1] and "Melanocytic nevus" in notes[-1]
    assert_data_error(lambda: train_test_sets("isic", {"split": "none.json"}, root, None, None),
                      "download: ISIC 2018 Task 3 (challenge.isic-archive.com)", "common.prepare isic")


def test_fraction_is_stratified_and_seeded():
    labels = np.array([0] * 500 + [1] * 100 + [2] * 10)
    a, b, c = fraction(labels, 0.1, 42), fraction(labels, 0.1, 42), fraction(labels, 0.1, 7)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.tolist() == sorted(set(a.tolist()))
    assert [int((labels[a] == k).sum()) for k in range(3)] == [50, 10, 1]
    assert [int((labels[fraction(labels, 0.01, 0)] == k).sum()) for k in range(3)] == [5, 1, 1]
    assert fraction(labels, 1.0, 0).tolist() == list(range(len(labels)))


def test_caption_cleaning_and_pairs_by_image_id(cls_dir):
    root, arrays = cls_dir
    assert clean_caption("1. No acute process. 2. Heart size is NORMAL.\nLungs: clear!") == \
        "no acute process heart size is normal lungs clear"
    assert clean_caption("Normal. OK.") == ""  # fewer than 3 tokens after dropping one-token sentences
    (root / "r.csv").write_text("image_path,report\nimg/b.png,Heart size normal. Lungs clear.\nimg/a.png,OK.\n"
                                "img/c.png,No effusion seen today.\n")
    assert read_pairs(root / "r.csv") == (["img/b.png", "img/c.png"], ["heart size normal lungs clear",
                                                                       "no effusion seen today"])
    (root / "m.csv").write_text("image_path,findings,impression\nimg/d.png,Lungs are clear.,No acute disease.\n")
    assert read_pairs(root / "m.csv") == (["img/d.png"], ["no acute disease lungs are clear"])  # impression first
    (root / "twice.csv").write_text("image_path,report\nimg/a.png,heart size normal\nimg/a.png,lungs are clear\n")
    assert_data_error(lambda: read_pairs(root / "twice.csv"), "twice.csv", "appears twice")
    assert_data_error(lambda: read_pairs(root / "none.csv"), "image-report CSV not found")
    (root / "bad.csv").write_text("path,report\nimg/a.png,x y z\n")
    assert_data_error(lambda: read_pairs(root / "bad.csv"), "expected an image_path column")
    images = Images(root, ["img/c.png", "img/a.png"], eval_transform(4, (0, 0, 0), (1, 1, 1)))
    assert len(images) == 2 and images.batch(0, 2).shape == (2, 3, 4, 4)
    assert torch.equal(images.batch(0, 2)[1], images[1])


def test_read_csv_is_public_and_says_when_the_file_is_missing(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n1,2\n\n3,4\n")
    header, rows = read_csv(tmp_path / "a.csv", ["x"], "test CSV")
    assert header == ["x", "y"] and rows == [(2, {"x": "1", "y": "2"}), (4, {"x": "3", "y": "4"})]
    assert_data_error(lambda: read_csv(tmp_path / "b.csv", ["x"], "test CSV"), "test CSV not found", "b.csv")


TINY_BPE = Path(__file__).resolve().parents[1] / "common" / "tokenizers" / "gpt2_tiny.json"


def test_bpe_tokenizer_from_a_file_a_folder_or_vocab_and_merges(tmp_path):
    text = "the heart is normal, no effusion."
    want = bpe_tokenizer(TINY_BPE).encode(text).ids
    assert len(want) > 3
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text(TINY_BPE.read_text())
    assert bpe_tokenizer(tmp_path / "json").encode(text).ids == want
    model = json.loads(TINY_BPE.read_text())["model"]  # GPT-2's older layout: vocab.json + merges.txt
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "old" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    assert bpe_tokenizer(tmp_path / "old").encode(text).ids == want
    assert_data_error(lambda: bpe_tokenizer(tmp_path), str(tmp_path), "no tokenizer.json")


def test_right_padded_pads_cuts_and_keeps_an_empty_text():
    tok = bpe_tokenizer(TINY_BPE)
    texts = ["no effusion", "the heart is normal and the lungs are clear", ""]
    ids, mask = right_padded(tok, texts, 6, pad=725)
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == mask.dtype == torch.long
    first = tok.encode(texts[0]).ids
    assert ids[0, :len(first)].tolist() == first and (ids[0, len(first):] == 725).all()
    assert mask[0].tolist() == [1] * len(first) + [0] * (6 - len(first))
    assert ids[1].tolist() == tok.encode(texts[1]).ids[:6] and mask[1].all()  # cut to the length
    assert ids[2].tolist() == [725] * 6 and mask[2].tolist() == [1, 0, 0, 0, 0, 0]  # empty: one pad to pool


# -----------------------------------------------------------------------------
# make_loader


class RandomDraws(Dataset):
    """Item i -> (i, torch draw, numpy draw, random draw): shows the order and the per-worker RNG streams."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import random
        return i, torch.rand(1).item(), float(np.random.rand()), random.random()


def test_make_loader_batches_and_order(cls_dir):
    root, arrays = cls_dir
    ds = ClassificationDataset(root, root / "split.json", "train")
    loader = make_loader(ds, batch_size=2, shuffle=False)
    assert isinstance(loader.sampler, SequentialSampler)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 4, 6) and batches[0][1].tolist() == [0, 2]
    assert torch.equal(batches[1][0][0], as_chw(arrays["img/c.png"]))
    assert len(list(make_loader(ds, batch_size=2, shuffle=False, drop_last=True))) == 1
    assert loader.pin_memory == torch.cuda.is_available()


def test_make_loader_shuffle_is_seeded():
    ds = list(range(8))  # item i is just i: no RNG use in the dataset itself

    def order(seed, epochs=2):
        loader = make_loader(ds, batch_size=3, shuffle=True, seed=seed)
        assert isinstance(loader.sampler, RandomSampler)
        return [[int(i) for b in loader for i in b] for _ in range(epochs)]

    a = order(0)
    assert a == order(0)  # same seed, same orders epoch after epoch
    assert sorted(a[0]) == list(range(8)) and a[0] != a[1]  # a permutation, reshuffled each epoch
    assert order(1) != a
    state = torch.get_rng_state()
    order(0)
    assert torch.equal(state, torch.get_rng_state())  # the loader's own generators leave the global RNG alone


def test_make_loader_workers_are_seeded():
    ds = RandomDraws()

    def draws(seed):
        loader = make_loader(ds, batch_size=2, shuffle=False, num_workers=2, seed=seed)
        assert loader.persistent_workers
        out = [tuple(float(v) for v in row) for b in loader for row in zip(*b)]
        del loader
        return out

    a = draws(0)
    assert a == draws(0) and a != draws(1)
    # batches 0 and 1 come from different workers: their torch, numpy and random streams must all differ
    assert a[0][0] == 0 and a[2][0] == 2
    assert all(a[0][k] != a[2][k] for k in (1, 2, 3))


def test_seed_worker_seeds_numpy_and_random():
    import random
    torch.manual_seed(2**40 + 7)  # inside a worker, torch.initial_seed() is base_seed + worker_id
    _seed_worker(0)
    got = (np.random.rand(), random.random())
    np.random.seed((2**40 + 7) % 2**32)
    random.seed(2**40 + 7)
    assert got == (np.random.rand(), random.random())


def test_make_loader_distributed_sampler(tmp_path):
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ds = RandomDraws()
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=3)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 3
        epoch = lambda e: (set_epoch(loader, e), [int(i) for b in loader for i in b[0]])[1]
        e0, e1 = epoch(0), epoch(1)
        assert sorted(e0) == list(range(8)) and e0 != e1 and epoch(0) == e0  # set_epoch reshuffles, reproducibly
        # DistributedSampler's order is torch.randperm(8) from a generator seeded with seed + epoch
        g = torch.Generator()
        g.manual_seed(3 + 1)
        assert e1 == torch.randperm(8, generator=g).tolist()
        plain = make_loader(ds, batch_size=4, shuffle=False)
        assert isinstance(plain.sampler, DistributedSampler) and [int(i) for b in plain for i in b[0]] == list(range(8))
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
    set_epoch(make_loader(RandomDraws(), 2, shuffle=True), 5)  # no set_epoch on RandomSampler: a no-op


# -----------------------------------------------------------------------------
# 4. segmentation split JSON


def write_mask(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8), "L").save(path)
    return a


@pytest.fixture
def seg_dir(tmp_path):
    """Two 6x4 images with masks: a 0/255 mask (a 2x3 block) and a 0/1-coded one (one pixel)."""
    write_png(tmp_path / "img" / "a.png", 10)
    write_png(tmp_path / "img" / "b.png", 20)
    m_a = np.zeros((4, 6), np.uint8)
    m_a[1:3, 2:5] = 255
    m_b = np.zeros((4, 6), np.uint8)
    m_b[3, 0] = 1
    write_mask(tmp_path / "masks" / "a.png", m_a)
    write_mask(tmp_path / "masks" / "b.png", m_b)
    write_split(tmp_path / "seg.json", {"train": [["img/a.png", "masks/a.png"], ["img/b.png", "masks/b.png"]],
                                        "test": [["img/b.png", "masks/b.png"]]})
    return tmp_path, m_a, m_b


def test_segmentation_dataset_items(seg_dir):
    root, m_a, m_b = seg_dir
    ds = SegmentationDataset(root, "seg.json", "train")
    assert len(ds) == 2 and ds.items[1] == ("img/b.png", "masks/b.png")
    image, mask = ds[0]
    assert image.shape == (3, 4, 6) and image.dtype == torch.float32 and mask.shape == (1, 4, 6)
    assert torch.equal(image, as_chw(write_png(root / "x.png", 10)))
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0].nonzero().tolist() == [[1, 2], [1, 3], [1, 4], [2, 2], [2, 3], [2, 4]]
    assert ds[1][1][0].nonzero().tolist() == [[3, 0]]  # a 0/1-coded mask: 1 is foreground
    palette = Image.fromarray(m_a // 255, "P")  # index 1 = foreground, whatever colour the palette gives it
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    palette.save(root / "masks" / "a.png")
    assert torch.equal(ds[0][1], mask)
    assert read_seg_split(root / "seg.json")["val"] == []


def test_segmentation_joint_transform_and_image_transform(seg_dir):
    root, _, _ = seg_dir
    seen = []

    def joint(image, mask):  # the same geometry for both: a horizontal flip, then tensors
        seen.append((image.size, mask.size, mask.mode))
        flip = Image.Transpose.FLIP_LEFT_RIGHT
        mask_tensor = torch.from_numpy(np.asarray(mask.transpose(flip)) > 0)[None].float()
        return as_chw(np.asarray(image.transpose(flip))), mask_tensor

    ds = SegmentationDataset(root, "seg.json", "train", joint_transform=joint, transform=lambda x: x * 2 - 1)
    image, mask = ds[0]
    assert seen == [((6, 4), (6, 4), "L")]
    assert mask[0].nonzero().tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]  # columns 2..4 -> 1..3
    flipped = as_chw(np.asarray(Image.open(root / "img" / "a.png")))[:, :, [5, 4, 3, 2, 1, 0]]
    assert torch.allclose(image, flipped * 2 - 1)  # transform saw the joint step's (flipped) image tensor
    # JointResize: bicubic image, nearest mask, so the mask stays exactly 0/1
    big = SegmentationDataset(root, "seg.json", "train", joint_transform=JointResize((8, 12)))
    image, mask = big[0]
    assert image.shape == (3, 8, 12) and mask.shape == (1, 8, 12)
    assert set(mask.unique().tolist()) == {0.0, 1.0} and mask.sum().item() == 4 * 6  # the 2x3 block, doubled


def test_segmentation_dataset_errors(seg_dir):
    root, _, _ = seg_dir
    (root / "masks" / "b.png").unlink()
    ds = SegmentationDataset(root, "seg.json", "train")
    assert_data_error(lambda: ds[1], "mask not found", "masks/b.png", "img/b.png")
    write_mask(root / "masks" / "b.png", np.zeros((5, 6)))
    assert_data_error(lambda: ds[1], "masks/b.png", "is 6x5", "is 6x4", "must match")
    (root / "masks" / "a.png").unlink()
    assert_data_error(lambda: SegmentationDataset(root, "seg.json", "train"), "first mask not found", "masks/a.png")
    (root / "masks" / "a.png").write_bytes(b"not a png")
    assert_data_error(lambda: SegmentationDataset(root, "seg.json", "train")[0], "cannot read mask", "masks/a.png")
    assert_data_error(lambda: SegmentationDataset(root, "seg.json", "val"), "split 'val' is empty")
    write_split(root / "bad.json", {"train": [["img/a.png", 0, "x"]]})
    assert_data_error(lambda: SegmentationDataset(root, "bad.json"), "train[0]", "[image_relpath, mask_relpath]")
    write_split(root / "bad.json", {"training": []})
    assert_data_error(lambda: read_seg_split(root / "bad.json"), "keys among")
    assert_data_error(lambda: SegmentationDataset(root, "nope.json"), "segmentation split file not found")
