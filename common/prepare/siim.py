"""SIIM-ACR Pneumothorax Segmentation: DICOMs + the run-length-encoded masks of train-rle.csv -> PNG images,
PNG masks and a segmentation split (adaptor.py).

The RLE is the competition's own (its mask_functions.py, used unchanged by MGCA and Adaptor): pairs of
(offset, length), each offset counted from the end of the previous run (the first from pixel 0), over the
pixels in column-major order (down the first column, then the next), so the flat array is reshaped to
(width, height) and transposed. "-1" means no pneumothorax; an image with several rows has several regions,
and its mask is their union.
"""
import os
from collections import Counter

import numpy as np

from common.data import DataError
from common.prepare.rsna import dicom_to_uint8, read_dicom
from common.prepare.util import (Output, find_dir, find_file, finish, parallel_map, read_csv, split_70_15_15,
                                 write_classification)

PAPER_COUNTS = {"siim": {}}
CLASSNAMES = {"siim": ["no pneumothorax", "pneumothorax"]}


def decode_rle(rle, width, height):
    """SIIM-ACR's relative, column-major RLE -> bool mask (height, width). ValueError if it does not fit."""
    numbers = [int(v) for v in rle.split()]
    if len(numbers) % 2:
        raise ValueError(f"an odd count of numbers ({len(numbers)}): not (offset, length) pairs")
    flat = np.zeros(width * height, bool)
    position = 0
    for offset, length in zip(numbers[0::2], numbers[1::2]):
        position += offset
        if offset < 0 or length <= 0 or position + length > flat.size:
            raise ValueError(f"a run at pixel {position} of length {length} falls outside the {width}x{height} image "
                             f"(is this the relative RLE of train-rle.csv?)")
        flat[position:position + length] = True
        position += length
    return flat.reshape(width, height).T


def encode_rle(mask):
    """The inverse of decode_rle: bool (height, width) -> "offset length ..." ("-1" for an empty mask)."""
    flat = np.concatenate([[False], np.asarray(mask, bool).T.reshape(-1), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # run starts and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return "-1"
    offsets = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{o} {e - s}" for o, s, e in zip(offsets, starts, ends))


def prepare_siim(src, out, *, seed=0, **opts):
    """SIIM-ACR Pneumothorax: train-rle.csv + dicom-images-train/**/*.dcm -> PNGs, masks, 70/15/15 split."""
    name, names = "siim", CLASSNAMES["siim"]
    need = "train-rle.csv and dicom-images-train/ (the SIIM-ACR training DICOMs)"
    csv_path = find_file(src, ["train-rle.csv", "*/train-rle.csv"], name, need)
    img_dir = find_dir(csv_path.parent, ["dicom-images-train"], name, need)
    on_disk = {}
    for dirpath, _, files in os.walk(img_dir):  # dicom-images-train/<study>/<series>/<ImageId>.dcm
        for f in files:
            if f.endswith(".dcm"):
                on_disk[f[:-4]] = os.path.join(dirpath, f)
    rles, warnings, skipped = {}, [], Counter()
    for r in read_csv(csv_path, ["ImageId", "EncodedPixels"]):  # the header says " EncodedPixels": stripped
        rles.setdefault(r["ImageId"], []).append(r["EncodedPixels"] or "-1")  # a blank cell: no mask either
    mixed = [i for i, v in rles.items() if "-1" in v and len(set(v)) > 1]
    if mixed:
        warnings.append(f"{csv_path.name}: {len(mixed)} image(s) have both '-1' and a mask row, e.g. {mixed[:3]}; "
                        f"their mask is the union of the mask rows")
    ids = sorted(i for i in rles if i in on_disk)
    skipped["listed in train-rle.csv, no DICOM on disk"] = len(rles) - len(ids)
    if not ids:
        raise DataError(f"siim: none of the {len(rles)} images of {csv_path} is under {img_dir} "
                        f"(expected dicom-images-train/<study>/<series>/<ImageId>.dcm)")
    labels = [int(any(v != "-1" for v in rles[i])) for i in ids]
    parts = split_70_15_15(labels, seed)
    with Output(out, csv_path.parent, seed=seed, **{**opts, "copy": True}) as o:

        def convert(i):
            pixels, photometric = read_dicom(on_disk[ids[i]])
            image = dicom_to_uint8(pixels, photometric)
            height, width = image.shape[:2]
            mask = np.zeros((height, width), bool)
            for rle in rles[ids[i]]:
                if rle != "-1":
                    try:
                        mask |= decode_rle(rle, width, height)
                    except ValueError as e:
                        raise DataError(f"{csv_path}: ImageId {ids[i]}: bad EncodedPixels ({e})") from None
            return o.save_image(f"images/{ids[i]}.png", image), o.save_mask(f"masks/{ids[i]}.png", mask)

        rel = parallel_map(convert, range(len(ids)), "converting DICOM and masks:")
        o.write_json("split_seg_siim.json", {s: [list(rel[i]) for i in idx] for s, idx in parts.items()})
        items = {s: [(rel[i][0], labels[i], names[labels[i]]) for i in idx] for s, idx in parts.items()}
        summary = write_classification(o, name, items, names, notes=[
            f"train-rle.csv decoded as relative column-major RLE, several rows = union; seeded stratified "
            f"70/15/15 by image (seed {seed}); split_siim.json holds pneumothorax yes/no (Adaptor trains on all "
            f"positives plus as many random negatives: the training script picks them)"], warnings=warnings)
        summary["skipped"] = dict(skipped)
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary
