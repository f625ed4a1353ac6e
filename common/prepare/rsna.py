"""RSNA Pneumonia Detection (stage 2): DICOMs -> PNGs, the pneumonia label per patient (cleft.py, adaptor.py,
alta.py). The DICOM reader lives here; other converters of DICOM data import it from this module."""
import numpy as np

from common.data import DataError
from common.prepare.util import (Output, check_exists, dedupe, find_dir, find_file, finish, number, parallel_map,
                                 read_csv, split_70_15_15, write_classification)

PAPER_COUNTS = {"rsna": {}, "rsna-seg": {}}
CLASSNAMES = {"rsna": ["normal", "pneumonia"]}


def dicom_to_uint8(pixels, photometric="MONOCHROME2"):
    """DICOM pixel array -> uint8 image the way CLEFT/ALTA do it: scale by 255/max, invert MONOCHROME1."""
    a = np.asarray(pixels, dtype=np.float64)
    a = a - min(a.min(), 0.0)  # signed data: shift so the darkest value is 0
    peak = a.max()
    a = np.zeros_like(a) if peak == 0 else a * 255.0 / peak  # multiply first: exact for integer pixels
    a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return 255 - a if photometric == "MONOCHROME1" else a


def read_dicom(path):
    """(pixel array, PhotometricInterpretation) of a DICOM file; needs pydicom (a prepare-only dependency)."""
    try:
        import pydicom
    except ImportError:
        raise DataError("reading DICOM needs pydicom, which only this converter uses: pip install pydicom "
                        "(JPEG-compressed files may also need pylibjpeg or gdcm)") from None
    try:
        ds = pydicom.dcmread(str(path))
        return ds.pixel_array, str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    except Exception as e:  # pydicom raises many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot decode DICOM ({type(e).__name__}: {e})") from None


def _rsna_source(src, name):
    """(labels CSV, image folder) of the RSNA stage 2 download."""
    need = "stage_2_train_labels.csv and stage_2_train_images/"
    return (find_file(src, ["stage_2_train_labels.csv"], name, need),
            find_dir(src, ["stage_2_train_images"], name, need))


def prepare_rsna(src, out, *, seed=0, **opts):
    """RSNA Pneumonia stage 2: stage_2_train_labels.csv + stage_2_train_images/*.dcm -> PNGs, 70/15/15 split."""
    name, names = "rsna", CLASSNAMES["rsna"]
    labels_csv, img_dir = _rsna_source(src, name)
    target = {}
    for r in read_csv(labels_csv, ["patientId", "Target"]):  # one row per box; a patient is positive if any
        if r["Target"] not in ("0", "1"):
            raise DataError(f"{labels_csv}: Target must be 0 or 1, got {r['Target']!r} for {r['patientId']}")
        target[r["patientId"]] = max(target.get(r["patientId"], 0), int(r["Target"]))
    ids = sorted(target)
    check_exists([img_dir / f"{p}.dcm" for p in ids], name)
    labels = [target[p] for p in ids]
    parts = split_70_15_15(labels, seed)
    with Output(out, src, seed=seed, **{**opts, "copy": True}) as o:  # converted PNGs always live in images/

        def convert(i):
            pixels, photometric = read_dicom(img_dir / f"{ids[i]}.dcm")
            return o.save_image(f"images/{ids[i]}.png", dicom_to_uint8(pixels, photometric))

        rel = parallel_map(convert, range(len(ids)), "converting DICOM:")
        items = {s: [(rel[i], labels[i], names[labels[i]]) for i in idx] for s, idx in parts.items()}
        summary = write_classification(o, name, items, names, notes=[
            f"stage_2_train_labels.csv (test images have no public labels); seeded stratified 70/15/15 by patient "
            f"(seed {seed}); DICOM -> 8-bit PNG scaled by 255/max, MONOCHROME1 inverted"])
        for s, fname in (("train", "train.csv"), ("val", "valid.csv"), ("test", "test.csv")):
            o.write_csv(fname, ["Path", "Pneumonia"], [[rel[i], labels[i]] for i in parts[s]])
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary


def box_mask(boxes, height, width):
    """Union of filled rectangles (x, y, w, h in pixels, top-left origin, as RSNA writes them) -> bool (H, W).
    Edges are rounded to whole pixels and clipped to the image."""
    mask = np.zeros((height, width), bool)
    for x, y, w, h in boxes:
        x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
        x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
        mask[y0:y1, x0:x1] = True
    return mask


def prepare_rsna_seg(src, out, *, seed=0, **opts):
    """RSNA Pneumonia boxes -> filled-rectangle masks (union per patient) + PNGs + segmentation split 70/15/15."""
    name, names = "rsna-seg", CLASSNAMES["rsna"]
    labels_csv, img_dir = _rsna_source(src, name)
    boxes, warnings = {}, []
    rows = read_csv(labels_csv, ["patientId", "x", "y", "width", "height", "Target"])
    for r in dedupe(rows, ["patientId", "x", "y", "width", "height"], labels_csv, warnings):
        pid, where = r["patientId"], f"{labels_csv}, patientId {r['patientId']}"
        if r["Target"] not in ("0", "1"):
            raise DataError(f"{where}: Target must be 0 or 1, got {r['Target']!r}")
        boxes.setdefault(pid, [])
        if r["Target"] == "1":
            box = tuple(number(r[c], f"{where}, column {c}") for c in ("x", "y", "width", "height"))
            if box[2] <= 0 or box[3] <= 0:
                raise DataError(f"{where}: box {box} has no area")
            boxes[pid].append(box)
    ids = sorted(boxes)
    check_exists([img_dir / f"{p}.dcm" for p in ids], name)
    labels = [int(bool(boxes[p])) for p in ids]
    parts = split_70_15_15(labels, seed)  # the same patients per split as `rsna` with the same seed
    with Output(out, src, seed=seed, **{**opts, "copy": True}) as o:

        def convert(i):
            pixels, photometric = read_dicom(img_dir / f"{ids[i]}.dcm")
            image = dicom_to_uint8(pixels, photometric)
            return (o.save_image(f"images/{ids[i]}.png", image),
                    o.save_mask(f"masks/{ids[i]}.png", box_mask(boxes[ids[i]], *image.shape[:2])))

        rel = parallel_map(convert, range(len(ids)), "converting DICOM and boxes:")
        o.write_json("split_seg_rsna.json", {s: [list(rel[i]) for i in idx] for s, idx in parts.items()})
        items = {s: [(rel[i][0], labels[i], names[labels[i]]) for i in idx] for s, idx in parts.items()}
        summary = write_classification(o, "rsna", items, names, notes=[
            f"masks = union of each patient's boxes (x, y, width, height) as filled rectangles, empty for Target 0; "
            f"the same seeded stratified 70/15/15 patients as `rsna` (seed {seed}); split_rsna.json holds the labels"],
            warnings=warnings)
        summary["boxes"] = sum(len(b) for b in boxes.values())
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary
