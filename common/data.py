"""
Dataset readers shared by the five method scripts, plus a DataLoader helper and the text plumbing (a BPE
tokenizer from a model folder, right-padded token ids).

Three on-disk formats (examples in data/README.md, "On-disk formats"):
  1. classification split JSON, as CoOp / CILMP write it:
       {"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}
     -> read_split(), classnames_from_split(), ClassificationDataset
  2. image-report CSV, as ALTA uses it: columns image_path, report and optionally auxview_image_path,
     last_image_path, last_auxview_image_path ("-1" or empty = that view is missing)
     -> ImageReportDataset; (image ids, MGCA-cleaned captions) for feature caches: read_pairs, Images
  3. CheXpert-style multi-label CSV: a Path column plus one column per finding holding 1 / 0 / -1 / blank
     -> MultiLabelDataset, caption_from_labels(); formats 2 and 3 as (image, caption) pairs: CaptionDataset;
        the single-positive rows of format 3 as a classification set: OneOfClassesDataset; (train, val, test)
        from a split JSON, or from format-3 CSVs with a split JSON's test set: classification_sets; (train,
        test) with a stratified label ratio: train_test_sets
  4. segmentation split JSON: {"train": [[image_relpath, mask_relpath], ...], "val": [...], "test": [...]},
     masks are single-channel PNGs of the image's size, 0 = background, 255 (or 1) = foreground
     -> read_seg_split(), SegmentationDataset, JointResize

Relative image paths are resolved against `root`; with root=None, against the folder of the split/CSV file.
Every problem with the user's files raises DataError with a message naming the file and what is wrong.
Only the csv/json modules, numpy, PIL, torch and (for bpe_tokenizer) tokenizers are used (no pandas, no
torchvision). missing_dataset says what to download and how to prepare a dataset that is not there;
dataset_file raises that message as a DataError.
"""

import csv
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler, Subset

from common.transforms import ToTensor


class DataError(Exception):
    """A problem with the user's data (missing file, bad column, bad label, ...). The message says which file."""


SPLIT_NAMES = ("train", "val", "test")

# -----------------------------------------------------------------------------
# small helpers


def _find_file(path, root, what):
    """Locate a split/CSV file: as given (absolute or relative to the cwd), else relative to `root`."""
    p = Path(path)
    if p.is_file():
        return p
    tried = [str(p)]
    if root is not None and not p.is_absolute():
        q = Path(root) / p
        if q.is_file():
            return q
        tried.append(str(q))
    raise DataError(f"{what} not found: {' or '.join(tried)}")


def _image_base(root, file_path):
    """Folder that relative image paths are resolved against: root, or the split/CSV file's folder."""
    return Path(root) if root is not None else Path(file_path).parent


def _check_first_image(root, relpath, file_path):
    """Check one image up front: a wrong root then fails at startup, not an hour into training."""
    first = Path(root) / relpath
    if not first.is_file():
        raise DataError(f"{file_path}: first image not found at {first} "
                        f"(relative paths are resolved against {root}; is root right?)")


def load_image(path):
    """
    Open an image file as an RGB PIL image. Grayscale (X-rays) is replicated to 3 channels; 16-bit grayscale
    (some PNG/TIFF exports) is mapped to 8 bits by dividing by 257, i.e. the full 16-bit range -> 0..255.
    NOTE PIL's own convert("RGB") would instead clip every 16-bit value above 255 to white.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # PIL opens lazily; force the decode here so a truncated file fails now, with our message
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                a = np.asarray(img).astype(np.float64)
                a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
                return Image.fromarray(a).convert("RGB")
            if img.mode == "F":
                raise DataError(f"cannot read image {path}: 32-bit float images are not supported; "
                                "convert it to 8-bit PNG/JPEG first")
            return img.convert("RGB")
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # `from None`: the user needs the file name and PIL's one-line reason, not PIL's internals
        raise DataError(f"cannot read image {path}: {e}") from None


# -----------------------------------------------------------------------------
# where a dataset lives, and what to say when it is not there

REPO_ROOT = Path(__file__).resolve().parent.parent

# Where to download each dataset folder under data/ (missing_dataset's message; `python -m common.prepare <folder>`
# then writes it). A method file's DATASETS entry may override it with its own "get".
SOURCES = {
    "demo": "built in: python -m common.demo",
    "isic": "ISIC 2018 Task 3 (challenge.isic-archive.com)",
    "dermamnist": "MedMNIST v2 dermamnist.npz (medmnist.com)",
    "derm7pt": "Derm7pt release_v0 (derm.cs.sfu.ca)",
    "adam": "ADAM challenge (amd.grand-challenge.org)",
    "aptos2019": "APTOS 2019 Blindness Detection (kaggle)",
    "odir": "ODIR-5K (kaggle / odir2019.grand-challenge.org)",
    "kvasir": "Kvasir v2 (datasets.simula.no/kvasir)",
    "pneumonia": "Kermany chest_xray (data.mendeley.com/datasets/rscbjbr9sj)",
    "cpn-x-ray": "CPN-X-ray (data.mendeley.com/datasets/dvntn9yhd2)",
    "chaoyang": "Chaoyang (bupt-ai-cz.github.io/HSA-NRL)",
    "fetal-us": "FETAL_PLANES_DB (zenodo.org/record/3904280)",
    "chexpert": "CheXpert v1.0 (stanfordmlgroup.github.io/competitions/chexpert)",
    "rsna": "RSNA Pneumonia Detection, stage 2 (kaggle.com/c/rsna-pneumonia-detection-challenge)",
    "rsna-seg": "RSNA Pneumonia Detection, stage 2 (kaggle.com/c/rsna-pneumonia-detection-challenge)",
    "embed": "EMBED (Emory, by application: github.com/Emory-HITI/EMBED_Open_Data)",
    "mimic-cxr": "MIMIC-CXR-JPG 2.0.0 + the MIMIC-CXR 2.0.0 reports (PhysioNet, credentialed)",
    "covidx": "COVIDx 9A (github.com/lindawangg/COVID-Net, docs/COVIDx.md)",
    "siim": "SIIM-ACR Pneumothorax Segmentation, stage-1 train (Kaggle, 2019)",
}


def dataset_root(name: str, entry: dict, data_dir=None) -> Path:
    """--data-dir, else data/<entry["dir"] or name> (two split files may share one folder)."""
    return Path(data_dir or REPO_ROOT / "data" / entry.get("dir", name))


def missing_dataset(name: str, entry: dict, root: Path, file=None) -> str | None:
    """None when root holds `file` (default: the split file, entry["split"]), else what to download
    (entry["get"], else SOURCES[folder]) and which command prepares it."""
    path = Path(root) / (file or entry["split"])
    if path.exists():
        return None
    folder = entry.get("dir", name)
    return (f"dataset {name!r} not found: expected {path}.\n"
            f"  1. download: {entry.get('get') or SOURCES.get(folder, 'see data/README.md')}\n"
            f"  2. prepare:  python -m common.prepare {folder} --src /path/to/the/download   (writes {root})\n"
            f"  details: data/README.md, section '{folder}'")


def dataset_file(name: str, entry: dict, root: Path, file=None) -> Path:
    """root / file (default: the split file, entry["split"]), or a DataError with missing_dataset's message."""
    problem = missing_dataset(name, entry, root, file)
    if problem:
        raise DataError(problem)
    return Path(root) / (file or entry["split"])


# -----------------------------------------------------------------------------
# 1. classification split JSON (CoOp / CILMP)


def read_split(path):
    """
    Read a CoOp-style split JSON -> {"train": [(relpath, label, classname)], "val": [...], "test": [...]}.
    A missing "val" (or "test"/"train") key becomes an empty list; CoOp-style callers then validate on "test"
    (see val_split_name). Labels and class names are checked for consistency across the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with keys {list(SPLIT_NAMES)}, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SPLIT_NAMES]
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; expected keys {list(SPLIT_NAMES)}")
    split = {}
    for name in SPLIT_NAMES:
        entries = raw.get(name, [])
        if not isinstance(entries, list):
            raise DataError(f"{path}: \"{name}\" must be a list of [relpath, label, classname], "
                            f"got {type(entries).__name__}")
        items = []
        for i, e in enumerate(entries):
            ok = (isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str) and e[0] != ""
                  and isinstance(e[1], int) and not isinstance(e[1], bool) and isinstance(e[2], str))
            if not ok:
                raise DataError(f"{path}: {name}[{i}] = {json.dumps(e)[:200]} is not "
                                "[relpath (non-empty string), label (int), classname (string)]")
            items.append((e[0], e[1], e[2]))
        split[name] = items
    if not any(split.values()):
        raise DataError(f"{path}: all splits are empty")
    classnames_from_split(split, source=path)  # validate now, so a bad file fails at read time
    return split


def classnames_from_split(split, source="split"):
    """
    Class names ordered by label, read from every entry of every split. Raises DataError if a label has two
    different names, or if the labels are not exactly 0..C-1 (a gap usually means a class was dropped from the
    file, and every later label would silently point at the wrong prompt).
    """
    names = {}  # label -> (classname, where first seen)
    for split_name, items in split.items():
        for i, (_, label, classname) in enumerate(items):
            if label not in names:
                names[label] = (classname, f"{split_name}[{i}]")
            elif names[label][0] != classname:
                raise DataError(f"{source}: label {label} is named {names[label][0]!r} in {names[label][1]} "
                                f"but {classname!r} in {split_name}[{i}]")
    if not names:
        raise DataError(f"{source}: no entries, so no class names")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        missing = sorted(set(range(max(max(labels) + 1, 0))) - set(labels))
        bad = [l for l in labels if l < 0]
        raise DataError(f"{source}: labels must be 0..C-1 with none missing; found {labels[:20]}"
                        + (f", missing {missing[:20]}" if missing else "")
                        + (f", negative {bad[:20]}" if bad else ""))
    return [names[l][0] for l in labels]


def val_split_name(split):
    """"val" if the split has validation entries, else "test" (CoOp falls back to test when val is empty)."""
    return "val" if split.get("val") else "test"


class ClassificationDataset(Dataset):
    """
    One split ("train" / "val" / "test") of a classification split JSON. Item: (image (C, H, W), label int).
    Attributes: classnames (from the whole file, ordered by label), labels (np.int64 (N,)), items
    [(relpath, label, classname)], root (folder the relpaths are relative to; None = the JSON's folder).
    transform=None gives ToTensor() only (images of different sizes then won't batch: pass eval_transform).
    """

    def __init__(self, root, split_file, split="train", transform=None):
        self.split_file = _find_file(split_file, root, "split file")
        if split not in SPLIT_NAMES:
            raise DataError(f"{self.split_file}: unknown split {split!r}; choose one of {list(SPLIT_NAMES)}")
        splits = read_split(self.split_file)
        self.items = splits[split]
        if not self.items:
            hint = " (no validation entries: use split='test' as CoOp does, see val_split_name)" if split == "val" else ""
            raise DataError(f"{self.split_file}: split {split!r} is empty{hint}")
        self.split = split
        self.classnames = classnames_from_split(splits, source=self.split_file)
        self.labels = np.array([label for _, label, _ in self.items], dtype=np.int64)  # (N,)
        self.root = _image_base(root, self.split_file)
        self.transform = transform if transform is not None else ToTensor()
        _check_first_image(self.root, self.items[0][0], self.split_file)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        relpath, label, _ = self.items[i]
        return self.transform(load_image(self.root / relpath)), label


# -----------------------------------------------------------------------------
# 4. segmentation split JSON


def read_seg_split(path):
    """
    Read a segmentation split JSON -> {"train": [(image_relpath, mask_relpath)], "val": [...], "test": [...]}.
    A missing key becomes an empty list; every entry must be a pair of non-empty strings.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"segmentation split file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict) or any(k not in SPLIT_NAMES for k in raw):
        raise DataError(f"{path}: expected a JSON object with keys among {list(SPLIT_NAMES)}")
    split = {}
    for name in SPLIT_NAMES:
        entries = raw.get(name, [])
        if not isinstance(entries, list):
            raise DataError(f"{path}: \"{name}\" must be a list of [image_relpath, mask_relpath]")
        for i, e in enumerate(entries):
            if not (isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(s, str) and s for s in e)):
                raise DataError(f"{path}: {name}[{i}] = {json.dumps(e)[:200]} is not [image_relpath, mask_relpath] "
                                "(two non-empty strings)")
        split[name] = [(e[0], e[1]) for e in entries]
    if not any(split.values()):
        raise DataError(f"{path}: all splits are empty")
    return split


def load_mask(path):
    """
    A mask file as a grayscale PIL image holding only 0 and 255 (mode L). Foreground is any value >= 128, or,
    for a mask coded 0/1 (max value 1), the value 1. Palette masks are read by index (index 1 = foreground in a
    0/1 mask); colour masks are converted to grayscale first.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"mask not found: {path}")
    try:
        with Image.open(path) as m:
            a = np.asarray(m if m.mode in ("L", "1", "P", "I;16", "I") else m.convert("L"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    fg = a >= (1 if a.max() == 1 else 128)
    return Image.fromarray(np.where(fg, 255, 0).astype(np.uint8), "L")


def _pair_to_tensors(image, mask):
    """(PIL image, PIL mask) -> (image (C, H, W) float in [0, 1], mask (1, H, W) float in {0, 1})."""
    return ToTensor()(image), torch.from_numpy(np.asarray(mask) >= 128).float()[None]


class JointResize:
    """
    A joint transform for SegmentationDataset: image and mask resized to the same (h, w) (image bicubic, mask
    nearest, so the mask stays 0/1), then both turned into tensors. size: int (square) or (h, w).
    """

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, image, mask):
        h, w = self.size
        return _pair_to_tensors(image.resize((w, h), Image.BICUBIC), mask.resize((w, h), Image.NEAREST))


class SegmentationDataset(Dataset):
    """
    One split of a segmentation split JSON. Item: (image (C, H, W) float, mask (1, H, W) float in {0, 1}).

    joint_transform(image_pil, mask_pil) -> (image_tensor, mask_tensor) applies the same geometry (resize,
    crop, flip) to both; the default turns both into tensors unchanged (JointResize(size) resizes both).
    transform, if given, is image-only and photometric: it gets the image tensor from the joint step (e.g.
    Normalize) and must keep its size. A missing mask, or a mask whose size differs from its image's, is a
    DataError naming the file. Attributes: items [(image_relpath, mask_relpath)], root.
    """

    def __init__(self, root, split_file, split="train", transform=None, joint_transform=None):
        self.split_file = _find_file(split_file, root, "segmentation split file")
        if split not in SPLIT_NAMES:
            raise DataError(f"{self.split_file}: unknown split {split!r}; choose one of {list(SPLIT_NAMES)}")
        self.items = read_seg_split(self.split_file)[split]
        if not self.items:
            raise DataError(f"{self.split_file}: split {split!r} is empty")
        self.split = split
        self.root = _image_base(root, self.split_file)
        self.transform = transform
        self.joint_transform = joint_transform if joint_transform is not None else _pair_to_tensors
        _check_first_image(self.root, self.items[0][0], self.split_file)
        if not (self.root / self.items[0][1]).is_file():
            raise DataError(f"{self.split_file}: first mask not found at {self.root / self.items[0][1]} "
                            f"(relative paths are resolved against {self.root}; is root right?)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image_rel, mask_rel = self.items[i]
        image = load_image(self.root / image_rel)
        mask_path = self.root / mask_rel
        if not mask_path.is_file():
            raise DataError(f"{self.split_file}: mask not found: {mask_path} (for image {image_rel})")
        mask = load_mask(mask_path)
        if mask.size != image.size:
            raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {self.root / image_rel} "
                            f"is {image.size[0]}x{image.size[1]} (width x height); a mask must match its image")
        image, mask = self.joint_transform(image, mask)
        if self.transform is not None:
            image = self.transform(image)
        return image, mask


# -----------------------------------------------------------------------------
# CSV reading shared by formats 2 and 3


def read_csv(path, required, what):
    """Read a CSV with a header row -> (header, [(line_number, row dict)]). Checks the required columns; every
    problem (a missing file too) is a DataError naming the file."""
    if not Path(path).is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        # utf-8-sig: Excel puts a BOM in front of the first column name, which would then not match "Path"
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: {what} is empty (no header row); expected columns {required}")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; expected columns {required} "
                                f"(found {header})")
            rows = []
            for fields in reader:
                if not fields or all(not x.strip() for x in fields):
                    continue  # blank line
                if len(fields) != len(header):
                    raise DataError(f"{path}: line {reader.line_num} has {len(fields)} fields but the header "
                                    f"has {len(header)} (an unquoted comma in a report?)")
                rows.append((reader.line_num, dict(zip(header, fields))))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None
    if not rows:
        raise DataError(f"{path}: {what} has a header but no data rows")
    return header, rows



# -----------------------------------------------------------------------------
# 2. image-report CSV (ALTA)

VIEW_COLUMNS = ("auxview_image_path", "last_image_path", "last_auxview_image_path")


def _view_path(value):
    """A view column's cell -> path string, or None when the view is missing ("-1" or empty)."""
    value = (value or "").strip()
    return None if value in ("", "-1") else value


class ImageReportDataset(Dataset):
    """
    Image-report pairs. Item: {"image": (C, H, W), "report": str}. With multiview=True also "auxview",
    "last_image", "last_auxview" (the other view of this study, and both views of the patient's previous
    study; zeros shaped like "image" when missing) and "has_auxview", "has_last", "has_last_auxview" (bool
    tensors). The view columns are optional: an absent column means that view is missing everywhere.
    Use a transform with a fixed output size (eval_transform / train_transform) or the views won't batch.
    """

    def __init__(self, root, csv_path, transform=None, multiview=False):
        self.csv_path = _find_file(csv_path, root, "image-report CSV")
        _, rows = read_csv(self.csv_path, ["image_path", "report"], "image-report CSV")
        self.root = _image_base(root, self.csv_path)
        self.transform = transform if transform is not None else ToTensor()
        self.multiview = multiview
        self.items = []
        for line, row in rows:
            image_path = row["image_path"].strip()
            if _view_path(image_path) is None:
                raise DataError(f"{self.csv_path}: line {line}: image_path is empty or -1 (the main view is required)")
            item = {"image_path": image_path, "report": row["report"]}
            for col in VIEW_COLUMNS:
                item[col] = _view_path(row.get(col))
            self.items.append(item)
        self.reports = [it["report"] for it in self.items]
        _check_first_image(self.root, self.items[0]["image_path"], self.csv_path)

    def __len__(self):
        return len(self.items)

    def _load(self, relpath):
        return self.transform(load_image(self.root / relpath))

    def __getitem__(self, i):
        item = self.items[i]
        image = self._load(item["image_path"])
        out = {"image": image, "report": item["report"]}
        if self.multiview:
            for key, col, flag in (("auxview", "auxview_image_path", "has_auxview"),
                                   ("last_image", "last_image_path", "has_last"),
                                   ("last_auxview", "last_auxview_image_path", "has_last_auxview")):
                path = item[col]
                out[key] = self._load(path) if path is not None else torch.zeros_like(image)
                out[flag] = torch.tensor(path is not None)
        return out


# -----------------------------------------------------------------------------
# image-report pairs by image id (for caches of frozen features: rows matched by id, never by position)


def clean_caption(text: str) -> str:
    """MGCA's caption cleaning (Adaptor's too): split into sentences on "N." and ".", lower-case, keep \\w+ tokens
    (ASCII only), drop sentences of <= 1 token; "" when fewer than 3 tokens remain (the study is then dropped)."""
    kept = []
    for s in (s for part in re.split(r"[0-9]+\.", text.replace("\n", " ")) for s in part.split(".")):
        toks = re.findall(r"\w+", s.replace("\ufffd\ufffd", " ").lower())
        toks = [t for t in (t.encode("ascii", "ignore").decode("ascii") for t in toks) if t] if len(toks) > 1 else []
        if toks:
            kept.append(" ".join(toks))
    return " ".join(kept) if sum(len(s.split()) for s in kept) >= 3 else ""


def read_pairs(path: Path) -> tuple:
    """An image-report CSV -> (ids = image paths, cleaned captions), in file order, studies with an empty caption
    dropped. The caption is impression + " " + findings when the CSV has a findings column (MIMIC-CXR, as MGCA),
    else its report column."""
    if not path.is_file():
        raise DataError(f"image-report CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image_path" not in rows[0]:
        raise DataError(f"{path}: expected an image_path column and a report (or findings + impression) column")
    ids, caps = [], []
    for r in rows:
        c = clean_caption(f"{r.get('impression', '')} {r['findings']}" if "findings" in r else r.get("report", ""))
        if c:
            ids.append(r["image_path"])
            caps.append(c)
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: an image_path appears twice; pairs are matched by it")
    return ids, caps


class Images(torch.utils.data.Dataset):
    """Images by path relative to root (the ids of a feature cache), through `transform`."""

    def __init__(self, root: Path, paths: list, transform):
        self.root, self.paths, self.transform = Path(root), paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_image(self.root / self.paths[i]))

    def batch(self, start: int, end: int) -> torch.Tensor:
        return torch.stack([self[i] for i in range(start, end)])


# -----------------------------------------------------------------------------
# 3. CheXpert-style multi-label CSV

# the 14 label columns of CheXpert's train.csv / valid.csv, in the file's order
CHEXPERT_FINDINGS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
# columns that are not findings; findings=None takes every other column
METADATA_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")


def _parse_label(cell):
    """A finding cell -> 1.0, 0.0, -1.0, or None for blank. CheXpert writes "1.0"/"0.0"/"-1.0"; blank = not mentioned."""
    s = cell.strip()
    if s == "" or s.lower() == "nan":  # pandas writes NaN as "" (or "nan" with some float formats)
        return None
    try:
        v = float(s)
    except ValueError:
        return "bad"
    return v if v in (1.0, 0.0, -1.0) else "bad"


class MultiLabelDataset(Dataset):
    """
    CheXpert-style multi-label CSV. Item: (image (C, H, W), labels float32 (F,), mask float32 (F,)).
    The mask is 0 where a label should be ignored by the loss (and by metrics), 1 elsewhere.

    uncertain: what -1 ("uncertain" in CheXpert) means: "zero" (U-Zeros: negative), "one" (U-Ones: positive),
               or "ignore" (label 0, mask 0).
    blank:     what an empty cell ("not mentioned in the report") means: "zero" (negative, mask 1; the usual
               CheXpert convention and the default) or "ignore" (label 0, mask 0).
    findings:  the label columns, in the order you want them; None = every column except Path and the
               metadata columns Sex, Age, Frontal/Lateral, AP/PA.
    Attributes: findings, labels (N, F) float32, mask (N, F) float32, paths [str], root, frontal (N,) bool
    (the rows whose AP/PA column is PA or AP: CheXpert's frontal views; all True without that column).
    """

    def __init__(self, root, csv_path, findings=None, uncertain="zero", transform=None, blank="zero"):
        if uncertain not in ("zero", "one", "ignore"):
            raise ValueError(f"uncertain must be 'zero', 'one' or 'ignore', got {uncertain!r}")
        if blank not in ("zero", "ignore"):
            raise ValueError(f"blank must be 'zero' or 'ignore', got {blank!r}")
        self.csv_path = _find_file(csv_path, root, "multi-label CSV")
        required = ["Path"] + (list(findings) if findings is not None else [])
        header, rows = read_csv(self.csv_path, required, "multi-label CSV")
        if findings is None:
            findings = [c for c in header if c not in METADATA_COLUMNS]
            if not findings:
                raise DataError(f"{self.csv_path}: no finding columns besides {list(METADATA_COLUMNS)} "
                                f"(found {header})")
        self.findings = list(findings)
        self.root = _image_base(root, self.csv_path)
        self.transform = transform if transform is not None else ToTensor()
        self.uncertain, self.blank = uncertain, blank

        n, f = len(rows), len(self.findings)
        self.labels = np.zeros((n, f), dtype=np.float32)  # (N, F)
        self.mask = np.ones((n, f), dtype=np.float32)  # (N, F)
        # CheXpert's AP/PA column: PA or AP on a frontal view, blank on a lateral one (no column: all frontal)
        self.frontal = np.array([row["AP/PA"].strip() in ("PA", "AP") if "AP/PA" in header else True
                                 for _, row in rows], dtype=bool)
        self.paths = []
        for r, (line, row) in enumerate(rows):
            path = row["Path"].strip()
            if not path:
                raise DataError(f"{self.csv_path}: line {line}: Path is empty")
            self.paths.append(path)
            for c, name in enumerate(self.findings):
                v = _parse_label(row[name])
                if v == "bad":
                    raise DataError(f"{self.csv_path}: line {line}, column {name!r}: value {row[name]!r} is not "
                                    "1, 0, -1 or blank (if this column is not a finding, pass findings=[...])")
                if v is None:  # blank
                    self.mask[r, c] = 0.0 if blank == "ignore" else 1.0
                elif v == -1.0:  # uncertain
                    self.labels[r, c] = 1.0 if uncertain == "one" else 0.0
                    self.mask[r, c] = 0.0 if uncertain == "ignore" else 1.0
                else:
                    self.labels[r, c] = v
        _check_first_image(self.root, self.paths[0], self.csv_path)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = self.transform(load_image(self.root / self.paths[i]))
        return image, torch.from_numpy(self.labels[i].copy()), torch.from_numpy(self.mask[i].copy())

    def caption(self, i):
        """The label-derived caption of row i (see caption_from_labels)."""
        return caption_from_labels(self.labels[i], self.findings)


def caption_from_labels(values, findings, prefix="this is a chest x ray of a patient with "):
    """
    Caption built from labels, CLEFT-style: prefix + ", ".join(lower-cased positive findings), or
    prefix + "no findings" when none is positive. Positive means value == 1 (after the uncertain policy);
    0 and -1 are not positive. E.g. [1, 0, 1] for (Edema, Fracture, Cardiomegaly) ->
    "this is a chest x ray of a patient with edema, cardiomegaly".
    NOTE CLEFT itself joins with a space and no comma; identical captions (many "no findings") are in-batch
    false negatives for a contrastive loss.
    """
    values = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    if len(values) != len(findings):
        raise ValueError(f"caption_from_labels: {len(values)} values but {len(findings)} findings")
    positives = [name.lower() for name, v in zip(findings, values) if v == 1.0]
    return prefix + (", ".join(positives) if positives else "no findings")


# -----------------------------------------------------------------------------
# views of formats 2 and 3: (image, caption) pairs, single-label rows, a fixed fraction of a training set


class CaptionDataset(Dataset):
    """
    (image, caption) pairs. From an image-report CSV (format 2): its report column. From a CheXpert-style
    multi-label CSV (format 3): caption_from_labels() of its findings, uncertain (-1) and blank counted as
    negative (how CLEFT captions CheXpert, which comes without reports). frontal_only keeps the frontal views
    of a multi-label CSV (MultiLabelDataset.frontal). Attributes: captions [str], rows (indices into the CSV).
    """

    def __init__(self, root, csv_path, transform=None, frontal_only=False, findings=CHEXPERT_FINDINGS):
        path = _find_file(csv_path, root, "image-text CSV")
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
        if "report" in header:
            self.ds = ImageReportDataset(root, path, transform)
            captions, keep = self.ds.reports, np.ones(len(self.ds), dtype=bool)
        else:
            self.ds = MultiLabelDataset(root, path, findings, uncertain="zero", transform=transform)
            captions = [caption_from_labels(v, self.ds.findings) for v in self.ds.labels]
            keep = self.ds.frontal if frontal_only else np.ones(len(self.ds), dtype=bool)
        self.rows = np.flatnonzero(keep)
        self.captions = [captions[i] for i in self.rows]
        if not self.captions:
            raise DataError(f"{path}: no frontal (AP/PA) image, and frontal_only leaves out the lateral views")

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        item = self.ds[self.rows[i]]
        return (item["image"] if isinstance(item, dict) else item[0]), self.captions[i]


class OneOfClassesDataset(Dataset):
    """
    (image, class index) from a multi-label CSV (format 3): the rows with exactly one positive among
    `classnames` (uncertain and blank = negative), labelled by it; frontal_only as in CaptionDataset. A
    classification set cut out of a multi-label one, e.g. CheXpert's single-finding rows for five classes.
    Attributes: labels (N,) int, classnames, rows (indices into the CSV).
    """

    def __init__(self, root, csv_path, classnames, transform=None, frontal_only=False):
        self.ds = MultiLabelDataset(root, csv_path, classnames, uncertain="zero", transform=transform)
        keep = (self.ds.labels.sum(1) == 1) & (self.ds.frontal if frontal_only else True)
        self.rows = np.flatnonzero(keep)
        if len(self.rows) == 0:
            raise DataError(f"{self.ds.csv_path}: no {'frontal ' if frontal_only else ''}row has exactly one "
                            f"positive among {list(classnames)}")
        self.labels, self.classnames = self.ds.labels[self.rows].argmax(1), list(classnames)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.ds[self.rows[i]][0], int(self.labels[i])


def train_test_sets(name: str, entry: dict, root: Path, train_transform, eval_transform, *,
                    label_ratio: float = 1.0, seed: int = 0, log=print):
    """(train, test) ClassificationDatasets of root / entry["split"] (DataError: missing_dataset's message);
    with label_ratio < 1 the training set keeps a stratified_subset. Class names come from the file (they are
    what a prompt says); a file whose names differ from the paper's (entry["classes"], else those the converter
    writes, common.prepare.CLASSNAMES[name]) is used, with a note."""
    problem = missing_dataset(name, entry, root)
    if problem:
        raise DataError(problem)
    split_file = root / entry["split"]
    train = ClassificationDataset(root, split_file, "train", train_transform)
    test = ClassificationDataset(root, split_file, "test", eval_transform)
    if label_ratio < 1:
        keep = stratified_subset(train.labels, label_ratio, seed)
        train.items, train.labels = [train.items[i] for i in keep], train.labels[keep]
        log(f"label ratio {label_ratio}: {len(keep)} training images (stratified, seed {seed})")
    from common.prepare import CLASSNAMES  # (here: common.prepare imports this module)
    want = entry.get("classes", CLASSNAMES.get(name))
    if want is not None and [c.lower() for c in train.classnames] != [c.lower() for c in want]:
        log(f"note: class names in {split_file} differ from the paper's: {train.classnames} vs {want}; "
            "using the file's (they are the prompt words)")
    return train, test


def classification_sets(root, split_file, train_transform=None, eval_transform=None, class_csvs=None,
                        frontal_only=False, frac=1.0, seed=42, n_classes=None):
    """
    (train, val, test) classification sets, each with .labels and .classnames. test is the "test" split of
    `split_file`; train / val are its "train" and "val" splits ("test" when "val" is empty, see val_split_name),
    or, given class_csvs = (train CSV, val CSV) in format 3, their rows with exactly one positive among the test
    classes (OneOfClassesDataset, frontal_only as there). frac < 1 keeps the fixed fraction_of(train, frac, seed).
    n_classes: the number of classes the caller expects (a DataError if the file has another).
    """
    test = ClassificationDataset(root, split_file, "test", eval_transform)
    if n_classes is not None and len(test.classnames) != n_classes:
        raise DataError(f"{split_file}: {n_classes} classes expected, the file has {len(test.classnames)}")
    if class_csvs is not None:
        train, val = (OneOfClassesDataset(root, f, test.classnames, t, frontal_only=frontal_only)
                      for f, t in zip(class_csvs, (train_transform, eval_transform)))
    else:
        train = ClassificationDataset(root, split_file, "train", train_transform)
        val = ClassificationDataset(root, split_file, val_split_name(read_split(test.split_file)), eval_transform)
    return (fraction_of(train, frac, seed) if frac < 1 else train), val, test


def stratified_subset(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Indices of a stratified `ratio` of a labelled set: from each class round(ratio * n_c) items, at least one,
    drawn with `seed`. Sorted, so a data order drawn over the subset stays a function of its own seed alone."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:max(1, round(ratio * int((labels == c).sum())))]
            for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def fraction(labels, pct: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified, seeded `pct` of the items (at least one per class present); all if pct >= 1.
    stratified_subset's idea with another draw (rng.choice per class): the label fractions of adaptor.py."""
    labels = np.asarray(labels)
    if pct >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(idx, max(1, round(pct * len(idx))), replace=False)
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(keep))


def fraction_of(ds, frac, seed=42):
    """
    A fixed random fraction of a labelled dataset (.labels, .classnames), at least one item: the first
    round(frac * N) of a numpy RandomState(seed) permutation, so every run with the same seed trains on the
    same items. A torch Subset that keeps .labels and .classnames for the selected items.
    """
    idx = np.random.RandomState(seed).permutation(len(ds))[:max(1, round(frac * len(ds)))]
    sub = Subset(ds, idx.tolist())
    sub.labels, sub.classnames = np.asarray(ds.labels)[idx], ds.classnames
    return sub


# -----------------------------------------------------------------------------
# DataLoader


def _seed_worker(worker_id):
    """
    Seed numpy and `random` in each worker from torch's per-worker seed (base_seed + worker_id). Recent torch
    does this itself; old versions did not, and forked workers then all drew the same numpy "random" numbers.
    """
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)


def make_loader(dataset, batch_size, shuffle, num_workers=0, drop_last=False, seed=0, collate_fn=None):
    """
    A DataLoader with the plumbing done once:
    - torch.distributed initialised: DistributedSampler(shuffle, seed, drop_last), so each rank gets its own
      1/world_size of the data. Call set_epoch(loader, epoch) at the start of every epoch or every epoch
      repeats epoch 0's order. NOTE without drop_last it pads by repeating samples so all ranks get the same
      count: eval metrics then count a few samples twice.
    - otherwise: RandomSampler with its own torch.Generator seeded by `seed` when shuffle, else in order.
    - workers: the per-worker seeds come from a generator seeded by (seed, rank), so runs are reproducible and
      ranks don't draw identical augmentations; numpy/random are seeded per worker too. With num_workers=0 the
      transforms draw from torch's global RNG: call torch.manual_seed once at the start of the run.
    - pin_memory when CUDA is available; persistent workers when num_workers > 0.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    worker_gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)  # also keeps the global RNG untouched
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=_seed_worker,
        generator=worker_gen,
        persistent_workers=num_workers > 0,
    )


def set_epoch(loader, epoch):
    """Tell the loader's sampler which epoch it is (needed by DistributedSampler to reshuffle); no-op otherwise."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


# -----------------------------------------------------------------------------
# text: a BPE tokenizer from a model folder, right-padded token ids


def bpe_tokenizer(path):
    """
    A byte-level BPE tokenizer (GPT-2 family) from a tokenizer.json file, or from a model folder holding
    tokenizer.json or, as older GPT-2 repositories ship it, vocab.json + merges.txt (then no prefix space, as
    GPT-2's own tokenizer). DataError when the folder has neither.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    path = Path(path)
    if path.is_file() or (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path if path.is_file() else path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = Tokenizer(BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
        return tok
    raise DataError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) next to the weights")


def right_padded(tok, texts, length, pad):
    """
    texts -> ids, mask, both (N, length) int64: each text's ids as the tokenizer gives them (no special token
    added), cut to `length`, then `pad` up to `length` (mask 0 there). An empty text becomes one pad token with
    mask 1, so every row has a position to pool.
    """
    ids = torch.full((len(texts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.long)
    for i, text in enumerate(texts):
        e = tok.encode(text).ids[:length] or [pad]
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
    return ids, mask
