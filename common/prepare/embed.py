"""EMBED (Emory Breast Imaging Dataset, open data): 2-D mammograms -> PNGs, CLEFT's metadata captions for
contrastive pre-training, and BI-RADS / density classification splits (cleft.py --data embed | embed-birads |
embed-density).

Source (--src), as the EMBED open-data release unpacks (access by application: github.com/Emory-HITI/EMBED_Open_Data):
    tables/EMBED_OpenData_metadata_reduced.csv      one row per image: anon_dicom_path, acc_anon (the study),
                                                    empi_anon (the patient), FinalImageType, ImageLateralityFinal,
                                                    ViewPosition
    tables/EMBED_OpenData_clinical_reduced.csv      one row per finding: acc_anon, side, tissueden, asses
    images/...                                      the DICOMs, where anon_dicom_path points after its
                                                    ".../anon_dicom/" prefix
The CLEFT authors' own split of the metadata, EMBED_OpenData_metadata_reduced_{train,valid,test}.csv in tables/,
is used when present; otherwise the patients are split 80 / 10 / 10, seeded.

Captions are built as the official EmbedPretrainingDataset does by default (XYPB/CLEFT datasets/embed_dataset.py
_create_captions_, no structural / natural / simple caption flag): 2-D images only; the clinical row of the same
study and breast side (else the study's first row);
    "This is a breast 2D full-field digital mammogram of a patient " + "on side {left|right|bilateral} "
    + "with view {ViewPosition} " + "with breast tissue density {k}:{density}. " + "with BIRADS score {b}:{desc}. "
side and view only when present; an image without a density or a BI-RADS assessment is skipped, as officially;
then lower-cased, reduced to its \\w+ words (ASCII) and joined by spaces, as the official sentence cleaning does.
Labels: BI-RADS 0..6 from the assessment letter (A N B P S M K); density A..D = tissueden 1..4 (5, "normal male
dense", has no density class, as officially). The official balanced test sets (7 x 200 BI-RADS, 4 x 500
density) are the authors' files and not reproduced: the test split here is every labelled test image.
"""
import re

import numpy as np

from common.data import DataError
from common.prepare.rsna import dicom_to_uint8, read_dicom
from common.prepare.util import Output, check_exists, find_file, finish, read_csv, split_json

BIRADS_LETTERS = {"A": 0, "N": 1, "B": 2, "P": 3, "S": 4, "M": 5, "K": 6}
BIRADS_DESC = {"A": "additional imaging required", "N": "negative", "B": "benign finding",
               "P": "probably benign finding", "S": "suspicious abnormality", "M": "highly suggestive of malignancy",
               "K": "known biopsy-proven malignancy"}
DENSITY_DESC = {1: "almost entirely fat", 2: "scattered fibroglandular densities", 3: "heterogeneously dense",
                4: "extremely dense", 5: "normal male dense"}
SIDES = {"L": "left", "R": "right", "B": "bilateral"}
CLASSNAMES = {"embed-birads": [f"BI-RADS {k}" for k in range(7)],
              "embed-density": ["density A", "density B", "density C", "density D"]}
PAPER_COUNTS = {"embed": {}}
META_COLUMNS = ["anon_dicom_path", "acc_anon", "empi_anon", "FinalImageType", "ImageLateralityFinal", "ViewPosition"]
CLINICAL_COLUMNS = ["acc_anon", "side", "tissueden", "asses"]
DEFAULT_MAX_SIDE = 512  # the official pipeline reads every mammogram at 256 (longest side): 512 keeps room


def density_of(cell):
    """tissueden cell ("2", "2.0", "") -> 1..5 or None."""
    try:
        value = float(cell)
    except ValueError:
        return None
    return int(value) if value in DENSITY_DESC else None


def build_caption(image_row, clinical_rows):
    """(caption, BI-RADS label, density label or None) of one 2-D image, or None when the official code skips it
    (no clinical row, no density, no BI-RADS assessment)."""
    if not clinical_rows:
        return None
    side = image_row["ImageLateralityFinal"]
    same_side = [r for r in clinical_rows if r["side"] == side]
    clinical = (same_side or clinical_rows)[0]
    density, letter = density_of(clinical["tissueden"]), clinical["asses"]
    if density is None or letter not in BIRADS_LETTERS:
        return None
    text = "This is a breast 2D full-field digital mammogram of a patient "
    if side in SIDES:
        text += f"on side {SIDES[side]} "
    if image_row["ViewPosition"]:
        text += f"with view {image_row['ViewPosition']} "
    text += f"with breast tissue density {density}:{DENSITY_DESC[density]}. "
    text += f"with BIRADS score {BIRADS_LETTERS[letter]}:{BIRADS_DESC[letter]}. "
    words = re.findall(r"\w+", text.lower().encode("ascii", "ignore").decode("ascii"))
    return " ".join(words), BIRADS_LETTERS[letter], (density - 1 if density <= 4 else None)


def dicom_file(src, anon_dicom_path):
    """The DICOM an anon_dicom_path names, under src/images/ (the path after its ".../anon_dicom/" prefix)."""
    rel = anon_dicom_path.split("anon_dicom/", 1)[-1].lstrip("/")
    return src / "images" / rel


def patient_split(rows, seed):
    """{split: rows}: patients (empi_anon) permuted with a seeded PCG64, 80 / 10 / 10."""
    patients = sorted({r["empi_anon"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val, n_test = round(0.1 * len(patients)), round(0.1 * len(patients))
    part = {patients[i]: ("val" if k < n_val else "test" if k < n_val + n_test else "train")
            for k, i in enumerate(order)}
    return {s: [r for r in rows if part[r["empi_anon"]] == s] for s in ("train", "val", "test")}


def prepare_embed(src, out, *, seed=0, **opts):
    """EMBED open data -> captions_{train,valid}.csv + split_embed-birads.json + split_embed-density.json."""
    name = "embed"
    expected = ("tables/EMBED_OpenData_metadata_reduced.csv (or the _train/_valid/_test split files), "
                "tables/EMBED_OpenData_clinical_reduced.csv and images/")
    clinical_csv = find_file(src, ["tables/EMBED_OpenData_clinical_reduced.csv", "EMBED_OpenData_clinical_reduced.csv"],
                             name, expected)
    warnings = []
    clinical = {}
    for r in read_csv(clinical_csv, CLINICAL_COLUMNS):
        clinical.setdefault(r["acc_anon"], []).append(r)
    split_files = {s: src / "tables" / f"EMBED_OpenData_metadata_reduced_{f}.csv"
                   for s, f in (("train", "train"), ("val", "valid"), ("test", "test"))}
    if all(p.is_file() for p in split_files.values()):
        tables = {s: read_csv(p, META_COLUMNS, unique=["anon_dicom_path"], warnings=warnings)
                  for s, p in split_files.items()}
        split_note = "the CLEFT authors' train / valid / test metadata files"
    else:
        meta_csv = find_file(src, ["tables/EMBED_OpenData_metadata_reduced.csv", "EMBED_OpenData_metadata_reduced.csv"],
                             name, expected)
        tables = patient_split(read_csv(meta_csv, META_COLUMNS, unique=["anon_dicom_path"], warnings=warnings), seed)
        split_note = f"patients split 80 / 10 / 10 (seed {seed}): the authors' split files were not in tables/"
    items, skipped = {}, 0
    for s, rows in tables.items():
        items[s] = []
        for r in rows:
            if r["FinalImageType"] != "2D":  # "Only use 2D mammograms", as officially
                continue
            built = build_caption(r, clinical.get(r["acc_anon"], []))
            if built is None:
                skipped += 1
                continue
            items[s].append((dicom_file(src, r["anon_dicom_path"]), *built))
    if not items["train"] or not items["test"]:
        raise DataError(f"{name}: no labelled 2-D image in the train or test split ({skipped} skipped without a "
                        f"density or BI-RADS assessment); is {clinical_csv} the clinical table of these images?")
    check_exists([path for rows in items.values() for path, *_ in rows], name)
    opts = dict(opts)
    opts["max_side"] = opts.get("max_side") or DEFAULT_MAX_SIDE
    with Output(out, src, seed=seed, **{**opts, "copy": True}) as o:  # converted PNGs live in images/
        converted = {}
        for rows in items.values():
            for path, *_ in rows:
                pixels, photometric = read_dicom(path)
                rel = path.relative_to(src / "images").with_suffix(".png").as_posix()
                converted[path] = o.save_image(f"images/{rel}", dicom_to_uint8(pixels, photometric))
        for s, fname in (("train", "captions_train.csv"), ("val", "captions_valid.csv")):
            o.write_csv(fname, ["image_path", "report"], [[converted[p], cap] for p, cap, _, _ in items[s]])
        birads, density = CLASSNAMES["embed-birads"], CLASSNAMES["embed-density"]
        o.write_json("split_embed-birads.json", split_json("embed-birads", {
            s: [(converted[p], b, birads[b]) for p, _, b, _ in rows] for s, rows in items.items()}, birads))
        o.write_json("split_embed-density.json", split_json("embed-density", {
            s: [(converted[p], d, density[d]) for p, _, _, d in rows if d is not None] for s, rows in items.items()},
            density))
        counts = {s: {"images": len(rows), **{c: sum(1 for _, _, b, _ in rows if b == k) for k, c in enumerate(birads)}}
                  for s, rows in items.items()}
        summary = {"counts": counts, "classnames": birads, "warnings": warnings, "notes": [
            f"splits: {split_note}", f"{skipped} 2-D images skipped (no density or BI-RADS assessment, as officially)",
            "captions as XYPB/CLEFT EmbedPretrainingDataset builds them by default; test = every labelled test "
            "image (the official balanced 7x200 / 4x500 subsets are the authors' files)",
            f"DICOM -> 8-bit PNG scaled by 255/max, MONOCHROME1 inverted, longest side at most {opts['max_side']}"]}
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary
