"""RSNA Pneumonia Detection (stage 2): DICOMs -> PNGs, the pneumonia label per patient (cleft.py, adaptor.py,
alta.py). The DICOM reader lives here; other converters of DICOM data import it from this module."""
import numpy as np

from common.data import DataError
from common.prepare.util import (Output, check_exists, find_dir, find_file, finish, progress, read_csv,
                                 stratified_split, write_classification)

PAPER_COUNTS = {"rsna": {}}
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


def prepare_rsna(src, out, *, seed=0, **opts):
    """RSNA Pneumonia stage 2: stage_2_train_labels.csv + stage_2_train_images/*.dcm -> PNGs, 70/15/15 split."""
    name, names = "rsna", CLASSNAMES["rsna"]
    labels_csv = find_file(src, ["stage_2_train_labels.csv"], name,
                           "stage_2_train_labels.csv and stage_2_train_images/")
    img_dir = find_dir(src, ["stage_2_train_images"], name, "stage_2_train_labels.csv and stage_2_train_images/")
    target = {}
    for r in read_csv(labels_csv, ["patientId", "Target"]):  # one row per box; a patient is positive if any
        if r["Target"] not in ("0", "1"):
            raise DataError(f"{labels_csv}: Target must be 0 or 1, got {r['Target']!r} for {r['patientId']}")
        target[r["patientId"]] = max(target.get(r["patientId"], 0), int(r["Target"]))
    ids = sorted(target)
    check_exists([img_dir / f"{p}.dcm" for p in ids], name)
    labels = [target[p] for p in ids]
    # MGCA's recipe: 70% train, the rest halved into valid and test, stratified here so each keeps the ratio
    rest_n = round(len(ids) * 0.3)
    tr, rest = stratified_split(labels, rest_n, seed)
    va_local, te_local = stratified_split([labels[i] for i in rest], rest_n - rest_n // 2, seed + 1)
    parts = {"train": tr, "val": [rest[i] for i in va_local], "test": [rest[i] for i in te_local]}
    with Output(out, src, seed=seed, **{**opts, "copy": True}) as o:  # converted PNGs always live in images/
        rel = {}
        for i in progress(tr + rest, "converting DICOM:"):
            pixels, photometric = read_dicom(img_dir / f"{ids[i]}.dcm")
            rel[i] = o.save_image(f"images/{ids[i]}.png", dicom_to_uint8(pixels, photometric))
        items = {s: [(rel[i], labels[i], names[labels[i]]) for i in idx] for s, idx in parts.items()}
        summary = write_classification(o, name, items, names, notes=[
            f"stage_2_train_labels.csv (test images have no public labels); seeded stratified 70/15/15 by patient "
            f"(seed {seed}); DICOM -> 8-bit PNG scaled by 255/max, MONOCHROME1 inverted"])
        for s, fname in (("train", "train.csv"), ("val", "valid.csv"), ("test", "test.csv")):
            o.write_csv(fname, ["Path", "Pneumonia"], [[rel[i], labels[i]] for i in parts[s]])
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary


