"""
Built-in synthetic demo data, so every script runs (and learns something) with no download.

    python -m common.demo [--root data/demo] [--seed 0] [--force] [--scale 1.0]
    from common.demo import ensure_demo; root = ensure_demo()     # builds on first use, then a no-op

It is a real learning problem stored in exactly the on-disk formats of the real datasets, so the real readers
(common/data.py, common/ct.py) read it and nothing in the method scripts is demo-specific:

  2D "skin lesion" photographs, RGB 112x112, 6 classes (CLASSNAMES). Each class has its own, overlapping,
  distributions of colour, border irregularity, size, texture and vessels (CLASS_PROFILES), on a random skin tone
  with random position, rotation, lighting and noise. A logistic regression on 16x16 pixels gets well above chance
  but far from 100%.
    images/000123.png                 the current image of patient 123 (one lesion = one patient)
    images/000123_aux.png             a second view of the same lesion (rotated, flipped, zoomed, relit)
    images/000123_prior.png           the same lesion at an earlier visit (smaller, more regular)
    images/000123_prior_aux.png       the second view of that earlier visit
    masks/000123.png                  the lesion mask of images/000123.png: uint8 grayscale (mode L), 255 inside
                                      the drawn lesion outline, 0 outside, same size as the image
    split_demo.json                   classification split {"train"|"val"|"test": [[relpath, label, classname]]},
                                      100 / 20 / 40 images per class at scale 1
    split_seg_demo.json               segmentation split {"train"|"val"|"test": [[image_relpath, mask_relpath]]},
                                      the same patients per split, in the same order, as split_demo.json
    classes.json                      class names and a few describing sentences per class
    reports_{train,val,test}.csv      image-report CSV: image_path, report, auxview_image_path, last_image_path,
                                      last_auxview_image_path ("-1" = missing: ~20% of second views, ~30% of
                                      priors). The report names the features actually drawn, the change since the
                                      prior, and in ~30% of cases the diagnosis.
    findings_{train,val,test}.csv     CheXpert-style multi-label CSV: Path + FINDINGS, values "1.0" / "0.0" /
                                      "-1.0" (uncertain: the feature is near its threshold) / "" (not mentioned)
    reports.csv, findings.csv         copies of the train files (the names the project brief uses); they hold
                                      training patients only, so nothing ever pretrains on test images
  The three splits of the CSVs hold exactly the patients of the same split in split_demo.json.

  CT-like volumes, int16, 64x64x32 voxels [x, y, z], NIfTI-1 .nii.gz, in CT-RATE's layout:
    ct/train/train_7/train_7_a/train_7_a_1.nii.gz, ct/valid/valid_3/valid_3_a/valid_3_a_1.nii.gz
    ct/labels_{train,test}.csv        VolumeName + CT_FINDINGS (0/1), CT-RATE's multi-abnormality layout
    ct/reports_{train,test}.csv       VolumeName, Findings_EN, Impressions_EN
    ct/metadata.csv                   VolumeName, RescaleSlope, RescaleIntercept, XYSpacing ("[0.75, 0.75]"), ZSpacing
  300 train / 150 test volumes at scale 1. A third of the volumes store raw = HU + 1024 (slope 1, intercept -1024)
  and a third raw = 2 * (HU + 1000) (slope 0.5, intercept -1000): scl_slope/scl_inter in the header and the
  metadata CSV agree, so both rescale paths of CTVolumeDataset give the same HU. Spacing varies (xy 0.7-0.8 mm,
  z 1.25-2 mm) so the resampling step matters. The test split is named "valid" in file names, as in CT-RATE.

Determinism: the same seed (and scale) gives byte-identical files on the same numpy/zlib/Pillow versions: every
lesion and volume gets its own numpy Generator seeded from (seed, stream, index), PNGs carry no metadata, gzip
has mtime 0 and no file name, and manifest.json has no timestamp.
"""

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common.ct import write_nifti

VERSION = 3  # 2: lesion masks + split_seg_demo.json; 3: 300 / 150 CT volumes (were 60 / 30)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = "data/demo"
SIZE = 112                    # image side in pixels
MM_PER_PX = 0.12              # so a lesion of radius 25 px is 6 mm across
PER_CLASS = {"train": 100, "val": 20, "test": 40}
CT_COUNTS = {"train": 300, "test": 150}  # 60 / 30 left medct_lora's demo AUROC at +-8 pp seed noise
CT_SHAPE = (64, 64, 32)       # (X, Y, Z) voxels
CT_TARGET_SPACING = (0.75, 0.75, 1.5)

# -----------------------------------------------------------------------------
# the 2D lesion classes: each feature has a class-conditional distribution, and they overlap on purpose

COLOURS = {  # name -> RGB of the pigment
    "black": (42, 32, 36), "dark brown": (84, 48, 34), "brown": (134, 80, 52), "tan": (190, 138, 100),
    "pink": (222, 132, 142), "red": (188, 44, 58), "purple": (112, 56, 116),
}
CLASSNAMES = ["melanoma", "nevus", "basal cell carcinoma", "seborrheic keratosis", "dermatofibroma",
              "vascular lesion"]
# colour probabilities; border irregularity, radius (px), speckle as (mean, sd); probability of vessels
CLASS_PROFILES = {
    "melanoma":             dict(colour={"black": .4, "dark brown": .35, "brown": .1, "purple": .1, "red": .05},
                                 border=(.7, .2), radius=(26, 5), speckle=(.65, .2), vessels=.15),
    "nevus":                dict(colour={"dark brown": .2, "brown": .6, "tan": .15, "pink": .05},
                                 border=(.2, .15), radius=(15, 3.5), speckle=(.2, .15), vessels=.05),
    "basal cell carcinoma": dict(colour={"pink": .6, "red": .1, "tan": .2, "brown": .1},
                                 border=(.38, .2), radius=(20, 4.5), speckle=(.3, .2), vessels=.7),
    "seborrheic keratosis": dict(colour={"tan": .45, "brown": .35, "dark brown": .15, "black": .05},
                                 border=(.5, .2), radius=(22, 5), speckle=(.72, .18), vessels=.08),
    "dermatofibroma":       dict(colour={"pink": .4, "brown": .35, "tan": .15, "red": .1},
                                 border=(.2, .15), radius=(12, 3), speckle=(.25, .15), vessels=.1),
    "vascular lesion":      dict(colour={"red": .6, "purple": .3, "pink": .1},
                                 border=(.15, .12), radius=(15, 4), speckle=(.2, .15), vessels=.35),
}
CLASS_DESCRIPTIONS = {
    "melanoma": ["a large dark brown or black lesion", "an irregular, notched border",
                 "a speckled, variegated texture with several shades"],
    "nevus": ["a small, round brown lesion", "a smooth, regular border", "a uniform texture"],
    "basal cell carcinoma": ["a pink, pearly lesion", "visible red branching vessels",
                             "a fairly smooth border"],
    "seborrheic keratosis": ["a tan to brown, stuck-on lesion", "a speckled, crumbly texture",
                             "a moderately irregular border"],
    "dermatofibroma": ["a small pink or brown nodule", "a smooth border", "a uniform texture"],
    "vascular lesion": ["a red or purple lesion", "a smooth, round border", "a small to medium size"],
}
FINDINGS = ["Irregular Border", "Dark Pigment", "Large Size", "Speckled Texture", "Red Vessels"]
CT_FINDINGS = ["Lung nodule", "Pleural effusion", "Emphysema", "Consolidation", "Cardiomegaly"]
CT_PREVALENCE = [0.4, 0.3, 0.3, 0.3, 0.3]


def resolve_root(root=DEFAULT_ROOT):
    """Relative roots are taken relative to the repository root (the parent of common/), not the cwd."""
    root = Path(root)
    return root if root.is_absolute() else REPO_ROOT / root

# -----------------------------------------------------------------------------
# sampling a lesion and rendering a view of it


def _normal(rng, mean_sd, lo, hi):
    return float(np.clip(rng.normal(*mean_sd), lo, hi))


def sample_lesion(rng, classname):
    """Draw the latent features of one lesion from its class profile. Coordinates are in lesion pixels."""
    p = CLASS_PROFILES[classname]
    names = list(p["colour"])
    colour = names[rng.choice(len(names), p=np.array(list(p["colour"].values())) / sum(p["colour"].values()))]
    n_vessels = int(rng.integers(2, 5)) if rng.random() < p["vessels"] else 0
    lesion = dict(
        colour=colour, rgb=(np.array(COLOURS[colour]) * rng.uniform(0.9, 1.1) + rng.normal(0, 3, 3)).astype(np.float32),
        border=_normal(rng, p["border"], 0.0, 1.0), radius=_normal(rng, p["radius"], 8.0, 40.0),
        speckle=_normal(rng, p["speckle"], 0.0, 1.0), aspect=float(rng.uniform(0.7, 1.0)),
        tilt=float(rng.uniform(0, np.pi)), opacity=float(rng.uniform(0.8, 0.97)),
        harm_amp=(rng.normal(0, 1, 6) / np.sqrt(_HARMONICS / 3)).astype(np.float32),  # damped high harmonics
        harm_phase=rng.uniform(0, 2 * np.pi, 6).astype(np.float32),
        texture=rng.normal(0, 1, (20, 20)).astype(np.float32),       # coarse texture grid, 4 px per cell
        dots=rng.normal(0, 1, (40, 40)).astype(np.float32),          # fine speckle grid, 2 px per cell
        vessel_strength=float(rng.uniform(0.35, 1.0)) if n_vessels else 0.0,
        vessels=[rng.uniform(-0.75, 0.75, (4, 2)).astype(np.float32) for _ in range(n_vessels)],  # polylines, x radius
    )
    return lesion


def earlier_lesion(lesion, rng):
    """The same lesion at a previous visit: smaller, more regular, less speckled, fainter vessels."""
    prior = dict(lesion)
    prior["radius"] = lesion["radius"] * float(rng.uniform(0.72, 0.92))
    prior["border"] = lesion["border"] * float(rng.uniform(0.6, 0.95))
    prior["speckle"] = lesion["speckle"] * float(rng.uniform(0.7, 1.0))
    prior["vessel_strength"] = lesion["vessel_strength"] * 0.7
    prior["rgb"] = lesion["rgb"] * 0.9 + np.array(COLOURS["tan"], np.float32) * 0.1
    return prior


def _bilinear(grid, x, y):
    """Sample a 2-D grid at float coordinates (in cells, clamped to the border)."""
    h, w = grid.shape
    x, y = np.clip(x, 0, w - 1.001), np.clip(y, 0, h - 1.001)
    x0, y0 = x.astype(np.int32), y.astype(np.int32)
    fx, fy = x - x0, y - y0
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bot = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _segment_distance(u, v, a, b):
    """Distance from points (u, v) to the segment a-b."""
    d = b - a
    t = np.clip(((u - a[0]) * d[0] + (v - a[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    return np.hypot(u - a[0] - t * d[0], v - a[1] - t * d[1])


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + np.float32(0.5)
_THETA = np.linspace(-np.pi, np.pi, 1024, endpoint=False).astype(np.float32)
_HARMONICS = np.array([3, 4, 5, 7, 9, 13], np.float32)  # border wobble frequencies


def lesion_outline(lesion):
    """
    The lesion's radius as a function of angle, tabulated at _THETA: an ellipse whose radius is modulated by a
    few harmonics, more so for an irregular border. (A table lookup is much cheaper than per-pixel cosines.)
    """
    t = _THETA - lesion["tilt"]
    ellipse = 1.0 / np.sqrt(np.cos(t) ** 2 + (np.sin(t) / lesion["aspect"]) ** 2)
    phases = _HARMONICS[:, None] * _THETA[None, :] + lesion["harm_phase"][:, None]          # (6, 1024)
    wobble = (lesion["harm_amp"][:, None] * np.cos(phases)).sum(0)
    return (lesion["radius"] * ellipse * (1 + 0.13 * lesion["border"] * wobble)).astype(np.float32)


def render(lesion, rng, skin, zoom=1.0, with_mask=False):
    """
    One photograph of `lesion` on `skin` ((SIZE, SIZE, 3) float32): random position, rotation, flip and
    lighting, so two calls give two views of the same lesion. zoom > 1 is a closer view.
    Returns uint8 (SIZE, SIZE, 3); with_mask=True also the lesion mask, uint8 (SIZE, SIZE) 0/255: the pixels
    inside the outline, where the soft edge is at least half the lesion's opacity (the mask draws no random
    numbers, so the photograph is the same either way).
    """
    f32 = np.float32
    cx, cy = rng.uniform(SIZE * 0.4, SIZE * 0.6, 2)
    angle, flip = rng.uniform(0, 2 * np.pi), rng.random() < 0.5
    zoom = zoom * rng.uniform(0.92, 1.08)
    # image pixels -> lesion coordinates (undo the view's rotation, zoom and flip)
    dx, dy = _XX - f32(cx), _YY - f32(cy)
    c, s = f32(np.cos(angle) / zoom), f32(np.sin(angle) / zoom)
    u, v = c * dx + s * dy, c * dy - s * dx
    if flip:
        v = -v
    rho = np.hypot(u, v)
    idx = ((np.arctan2(v, u) + f32(np.pi)) * f32(len(_THETA) / (2 * np.pi))).astype(np.int32) % len(_THETA)
    outline = lesion_outline(lesion)[idx]                                      # (H, W) lesion radius at each angle
    alpha = f32(lesion["opacity"]) / (1 + np.exp((rho - outline) / f32(1.2)))  # (H, W) soft edge
    # pigment with coarse blotches and fine dots, both fixed to the lesion so they turn with it
    coarse = _bilinear(lesion["texture"], u / 4 + 10, v / 4 + 10)
    fine = _bilinear(lesion["dots"], u / 2 + 20, v / 2 + 20)
    shade = 1 + f32(lesion["speckle"]) * (f32(0.28) * coarse + f32(0.32) * np.clip(fine, -1.5, 1.5)) + f32(0.04) * coarse
    pigment = lesion["rgb"][None, None, :] * shade[..., None]                 # (H, W, 3)
    if lesion["vessels"]:
        near = np.zeros_like(rho)
        for line in lesion["vessels"]:
            pts = line * f32(lesion["radius"])
            for a, b in zip(pts[:-1], pts[1:]):
                near = np.maximum(near, np.clip(1.3 - _segment_distance(u, v, a, b), 0, 1))
        mix = (near * f32(lesion["vessel_strength"]))[..., None]
        pigment = pigment * (1 - mix) + np.array([172, 28, 44], np.float32) * mix
    # lighting: overall brightness and a gradient across the photo
    gx, gy, bright = (f32(x) for x in (rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12), rng.uniform(0.9, 1.08)))
    light = bright * (1 + gx * (_XX / SIZE - f32(0.5)) + gy * (_YY / SIZE - f32(0.5)))
    a = alpha[..., None]
    img = (skin * (1 - a) + pigment * a) * light[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * f32(5)           # sensor noise
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if with_mask:
        return img, np.where(rho < outline, 255, 0).astype(np.uint8)
    return img


def sample_skin(rng):
    """A skin image (SIZE, SIZE, 3) float32: a tone between light and brown, mildly mottled."""
    t = rng.uniform(0, 1) ** 1.5
    tone = np.array([236, 204, 184], np.float32) * (1 - t) + np.array([160, 112, 84], np.float32) * t
    mottle = 1 + np.float32(0.03) * _bilinear(rng.normal(0, 1, (16, 16)).astype(np.float32), _XX / 8, _YY / 8)
    return tone.astype(np.float32)[None, None, :] * mottle[..., None]


def save_png(path, img):
    """PNG with no metadata (PIL adds no timestamp unless asked), so the bytes depend only on the pixels."""
    Image.fromarray(img, "RGB" if img.ndim == 3 else "L").save(path, format="PNG", compress_level=1)

# -----------------------------------------------------------------------------
# what a reader would say: multi-label findings and a report, both from the drawn features


def finding_values(lesion, rng):
    """
    CheXpert-style values for FINDINGS: "1.0" / "0.0", "-1.0" when the feature is close to its threshold
    (a reader would hedge) and "" when the report does not mention it (~6%).
    """
    def graded(x, thr, band):
        if abs(x - thr) < band and rng.random() < 0.6:
            return "-1.0"
        return "1.0" if x > thr else "0.0"
    dark = "1.0" if lesion["colour"] in ("black", "dark brown") else ("-1.0" if lesion["colour"] == "brown"
                                                                      and rng.random() < 0.2 else "0.0")
    vessels = "0.0" if not lesion["vessels"] else ("-1.0" if lesion["vessel_strength"] < 0.5
                                                    and rng.random() < 0.5 else "1.0")
    values = [graded(lesion["border"], 0.5, 0.07), dark, graded(lesion["radius"], 23.0, 1.5),
              graded(lesion["speckle"], 0.5, 0.07), vessels]
    return ["" if rng.random() < 0.06 else v for v in values]


def lesion_report(lesion, values, classname, prior, rng):
    """A short clinical-style description naming the drawn colour, border, size, texture and vessels."""
    border, _, size, texture, vessels = values
    mm = 2 * lesion["radius"] * MM_PER_PX
    size_word = {"1.0": "large", "-1.0": "moderately large", "0.0": "small" if lesion["radius"] < 16 else "medium-sized",
                 "": ""}[size]
    what = rng.choice(["lesion", "pigmented lesion", "skin lesion"]) if lesion["colour"] not in ("pink", "red") else "lesion"
    head = f"{rng.choice(['Clinical photograph shows', 'There is', 'Image demonstrates'])} a " + \
           ", ".join(w for w in [size_word, lesion["colour"]] if w) + f" {what}"
    if size in ("1.0", "-1.0") and rng.random() < 0.5:
        head += f" measuring about {mm:.0f} mm"
    parts = [head]
    parts += [{"1.0": "with an irregular, notched border", "-1.0": "with a possibly irregular border",
               "0.0": "with a smooth, well-defined border", "": ""}[border]]
    parts += [{"1.0": "and a speckled, variegated texture", "-1.0": "and a slightly mottled texture",
               "0.0": "and a uniform texture", "": ""}[texture]]
    sentences = [" ".join(p for p in parts if p) + "."]
    sentences += [{"1.0": "Red branching vessels are visible.", "-1.0": "Possible fine red vessels.",
                   "0.0": rng.choice(["No vessels are seen.", ""]), "": ""}[vessels]]
    if prior is not None:
        growth = lesion["radius"] / prior["radius"] - 1
        change = f"Compared with the prior image the lesion has enlarged by about {100 * growth:.0f}%"
        if lesion["border"] - prior["border"] > 0.1:
            change += " and its border has become more irregular"
        sentences.append(change + ".")
    if rng.random() < 0.3:
        sentences.append(rng.choice(["Appearance is most consistent with {}.", "Findings suggest {}.",
                                     "Impression: {}."]).format(classname))
    return " ".join(s for s in sentences if s)

# -----------------------------------------------------------------------------
# writing the 2D part


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_split(path, split):
    """A split JSON with one entry per line: readable and diff-able."""
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(f' "{s}": [\n  ' + ",\n  ".join(json.dumps(e) for e in split[s]) + "\n ]"
                                   for s in split) + "\n}\n")


def _counts(per_split, scale, minimum):
    return {k: max(minimum, int(round(n * scale))) for k, n in per_split.items()}


def build_images(root, seed, scale):
    """All 2D files. Returns the per-split image counts."""
    counts = _counts(PER_CLASS, scale, 2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    # patient ids are shuffled so classes and splits are interleaved on disk
    items = [(c, s) for c in range(len(CLASSNAMES)) for s in counts for _ in range(counts[s])]
    order = np.random.default_rng([seed, 0]).permutation(len(items))
    split = {s: [] for s in counts}
    seg = {s: [] for s in counts}
    reports = {s: [] for s in counts}
    findings = {s: [] for s in counts}
    for pid, j in enumerate(order):
        label, s = items[j]
        classname = CLASSNAMES[label]
        rng = np.random.default_rng([seed, 1, pid])  # one stream per patient: independent of the build order
        lesion, skin = sample_lesion(rng, classname), sample_skin(rng)
        stem = f"images/{pid:06d}"
        image, mask = render(lesion, rng, skin, with_mask=True)
        save_png(root / f"{stem}.png", image)
        save_png(root / f"masks/{pid:06d}.png", mask)
        aux = last = last_aux = "-1"
        if rng.random() < 0.8:
            aux = f"{stem}_aux.png"
            save_png(root / aux, render(lesion, rng, skin, zoom=float(rng.uniform(1.1, 1.4))))
        prior = None
        if rng.random() < 0.7:
            prior = earlier_lesion(lesion, rng)
            last = f"{stem}_prior.png"
            save_png(root / last, render(prior, rng, skin))
            if rng.random() < 0.8:
                last_aux = f"{stem}_prior_aux.png"
                save_png(root / last_aux, render(prior, rng, skin, zoom=float(rng.uniform(1.1, 1.4))))
        values = finding_values(lesion, rng)
        split[s].append([f"{stem}.png", label, classname])
        seg[s].append([f"{stem}.png", f"masks/{pid:06d}.png"])
        reports[s].append([f"{stem}.png", lesion_report(lesion, values, classname, prior, rng), aux, last, last_aux])
        findings[s].append([f"{stem}.png", *values])

    _write_split(root / "split_demo.json", split)
    _write_split(root / "split_seg_demo.json", seg)
    with open(root / "classes.json", "w") as f:
        json.dump({"classnames": CLASSNAMES, "descriptions": CLASS_DESCRIPTIONS, "findings": FINDINGS}, f, indent=1)
    report_cols = ["image_path", "report", "auxview_image_path", "last_image_path", "last_auxview_image_path"]
    for s in counts:
        _write_csv(root / f"reports_{s}.csv", report_cols, reports[s])
        _write_csv(root / f"findings_{s}.csv", ["Path", *FINDINGS], findings[s])
    shutil.copyfile(root / "reports_train.csv", root / "reports.csv")
    shutil.copyfile(root / "findings_train.csv", root / "findings.csv")
    return {s: len(v) for s, v in split.items()}

# -----------------------------------------------------------------------------
# the CT part: a toy chest with lungs, heart and spine, and five findings drawn into it


def _ellipsoid(ux, uy, uz, c, r):
    """Normalised squared distance to an axis-aligned ellipsoid: < 1 inside."""
    return ((ux - c[0]) / r[0]) ** 2 + ((uy - c[1]) / r[1]) ** 2 + ((uz - c[2]) / r[2]) ** 2


def _ball(ux, uy, uz, c, r):
    """Soft membership (0..1) of a sphere of radius r, with a one-voxel partial-volume edge."""
    d = np.sqrt((ux - c[0]) ** 2 + (uy - c[1]) ** 2 + (uz - c[2]) ** 2)
    return np.clip(r - d + 0.5, 0, 1)


def make_ct(rng, labels, spacing):
    """
    HU volume [x, y, z] of shape CT_SHAPE with the findings in `labels` (0/1 per CT_FINDINGS), plus a dict of
    details for the report. Anatomy is laid out in units of target voxels (0.75, 0.75, 1.5 mm) around the centre,
    so after resampling to the target spacing it has the same size whatever the stored spacing. Axes follow RAS+:
    +x is the patient's left, +y anterior, +z superior.
    """
    nx, ny, nz = CT_SHAPE
    ux = ((np.arange(nx) - (nx - 1) / 2) * spacing[0] / CT_TARGET_SPACING[0])[:, None, None].astype(np.float32)
    uy = ((np.arange(ny) - (ny - 1) / 2) * spacing[1] / CT_TARGET_SPACING[1])[None, :, None].astype(np.float32)
    uz = ((np.arange(nz) - (nz - 1) / 2) * spacing[2] / CT_TARGET_SPACING[2])[None, None, :].astype(np.float32)
    nodule, effusion, emphysema, consolidation, cardiomegaly = labels
    info = {}
    hu = np.full(CT_SHAPE, -1000.0, np.float32)
    body = (ux / 29) ** 2 + (uy / 23) ** 2 + 0 * uz
    hu[body < 1] = -90.0                                       # subcutaneous fat
    hu[body < 0.8] = 40.0                                      # soft tissue
    lungs = []
    for side, cx in (("right", -12.0), ("left", 12.0)):
        c, r = (cx + rng.normal(0, 0.7), -1.0, 0.0), (9.0 + rng.normal(0, 0.5), 14.0, 15.0)
        inside = _ellipsoid(ux, uy, uz, c, r) < 1
        hu[inside] = -860.0 if not emphysema else -915.0
        lungs.append((side, c, r, inside))
    lung = lungs[0][3] | lungs[1][3]
    hu += lung * rng.normal(0, 25, CT_SHAPE).astype(np.float32)       # parenchymal texture

    def point_in_lung(margin=3.0):
        side, c, r, _ = lungs[rng.integers(2)]
        while True:
            p = rng.uniform(-1, 1, 3)
            if p @ p < (1 - margin / min(r)) ** 2:
                return side, [c[i] + p[i] * r[i] for i in range(3)], ("upper" if p[2] > 0 else "lower")

    # normal vessels and a few tiny air cysts in every lung: the confounders for nodules and emphysema
    for _ in range(int(rng.integers(6, 14))):
        _, p, _ = point_in_lung()
        hu = np.where(lung, hu + _ball(ux, uy, uz, p, rng.uniform(0.6, 1.2)) * 600, hu)
    if emphysema:
        for _ in range(int(rng.integers(14, 28))):
            _, p, _ = point_in_lung(2.0)
            hu = np.where(lung, np.minimum(hu, -1000 + (1 - _ball(ux, uy, uz, p, rng.uniform(1.0, 2.6))) * 1000), hu)
    if consolidation:
        side, p, lobe = point_in_lung(5.0)
        blob = np.zeros(CT_SHAPE, np.float32)
        for _ in range(int(rng.integers(3, 5))):
            q = [p[i] + rng.normal(0, 2.0) for i in range(3)]
            blob = np.maximum(blob, _ball(ux, uy, uz, q, rng.uniform(2.5, 4.5)))
        hu = np.where(lung, hu * (1 - blob) + rng.uniform(-60, 20) * blob, hu)
        info["consolidation"] = (side, lobe)
    if nodule:
        sizes = []
        for _ in range(int(rng.integers(1, 3))):
            side, p, lobe = point_in_lung(4.0)
            radius = rng.uniform(1.6, 3.4)
            ball = _ball(ux, uy, uz, p, radius)
            hu = np.where(lung, hu * (1 - ball) + 45 * ball, hu)
            sizes.append((side, lobe, 2 * radius * CT_TARGET_SPACING[0]))
        info["nodules"] = sizes
    if effusion:
        sides = ("right", "left", "bilateral")[rng.integers(3)]
        depth = rng.uniform(5, 10)
        for side, c, r, inside in lungs:
            if sides in (side, "bilateral"):
                fluid = inside & (uy < c[1] - r[1] + depth + 0.02 * (ux - c[0]) ** 2)
                hu[fluid] = 15.0
        info["effusion"] = (sides, depth * CT_TARGET_SPACING[1] * 2)
    # heart (after the lungs, it pushes them aside), spine, trachea
    scale = rng.uniform(1.3, 1.5) if cardiomegaly else rng.uniform(0.9, 1.05)
    hu[_ellipsoid(ux, uy, uz, (3.0, 8.0, -2.0), (8 * scale, 7 * scale, 8 * scale)) < 1] = 45.0
    hu[((ux / 4.0) ** 2 + ((uy + 17) / 4.0) ** 2 + 0 * uz) < 1] = 650.0
    hu[((ux / 2.0) ** 2 + ((uy + 3) / 2.0) ** 2 < 1) & (uz > 6)] = -1000.0
    hu += rng.normal(0, 18, CT_SHAPE).astype(np.float32)              # scanner noise
    return np.clip(hu, -1024, 3071), info


def ct_report(labels, info, rng):
    """(Findings_EN, Impressions_EN) in CT-RATE's style, naming what was drawn and often the negatives."""
    nodule, effusion, emphysema, consolidation, cardiomegaly = labels
    f = ["Trachea and both main bronchi are patent."]
    imp = []
    if cardiomegaly:
        f.append("The heart is enlarged. Cardiomegaly is present.")
        imp.append("Cardiomegaly.")
    elif (r := rng.random()) < 0.7:  # some negatives in the zero-shot prompts' words, most in a radiologist's
        f.append("Heart size is normal." if r < 0.5 else "Cardiomegaly is not present.")
    if emphysema:
        f.append("Emphysematous changes with small bullae are seen in both lungs.")
        imp.append("Emphysema.")
    elif (r := rng.random()) < 0.5:
        f.append("No emphysema." if r < 0.3 else "Emphysema is not present.")
    if nodule:
        for side, lobe, mm in info["nodules"]:
            f.append(f"A {mm:.0f} mm solid nodule is seen in the {lobe} lobe of the {side} lung.")
        imp.append("Lung nodule." if len(info["nodules"]) == 1 else "Lung nodules.")
    elif (r := rng.random()) < 0.6:
        f.append("No mass or nodule was detected in either lung." if r < 0.4 else "Lung nodule is not present.")
    if consolidation:
        side, lobe = info["consolidation"]
        f.append(f"There is an area of consolidation in the {lobe} lobe of the {side} lung.")
        imp.append(f"Consolidation in the {side} lung, pneumonia?")
    elif (r := rng.random()) < 0.5:
        f.append("No consolidation." if r < 0.3 else "Consolidation is not present.")
    if effusion:
        sides, mm = info["effusion"]
        where = "Bilateral pleural effusion" if sides == "bilateral" else f"{sides.capitalize()} pleural effusion"
        f.append(f"{where} is present, about {mm:.0f} mm thick.")
        imp.append(f"{where}.")
    elif (r := rng.random()) < 0.6:
        f.append("No pleural effusion." if r < 0.4 else "Pleural effusion is not present.")
    return " ".join(f), " ".join(imp) if imp else "No acute cardiopulmonary abnormality."


RESCALES = [(1.0, -1024.0), (1.0, 0.0), (0.5, -1000.0)]  # (slope, intercept): raw = (HU - intercept) / slope


def build_ct(root, seed, scale):
    """All CT files under root/ct. Returns the per-split volume counts."""
    counts = _counts(CT_COUNTS, scale, 2)
    ct = root / "ct"
    meta = []
    for split, prefix in (("train", "train"), ("test", "valid")):
        labels_rows, report_rows = [], []
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, 2 if split == "train" else 3, i])
            labels = [int(rng.random() < p) for p in CT_PREVALENCE]
            spacing = (float(rng.choice([0.7, 0.75, 0.8])),) * 2 + (float(rng.choice([1.25, 1.5, 1.5, 2.0])),)
            hu, info = make_ct(rng, labels, spacing)
            slope, inter = RESCALES[i % 3]
            raw = np.rint((hu - inter) / slope).astype(np.int16)
            name = f"{prefix}_{i + 1}_a_1.nii.gz"
            write_nifti(ct / prefix / f"{prefix}_{i + 1}" / f"{prefix}_{i + 1}_a" / name, raw, spacing, slope, inter)
            findings_en, impressions_en = ct_report(labels, info, rng)
            labels_rows.append([name, *labels])
            report_rows.append([name, findings_en, impressions_en])
            meta.append([name, f"{slope:g}", f"{inter:g}", f"[{spacing[0]:g}, {spacing[1]:g}]", f"{spacing[2]:g}"])
        _write_csv(ct / f"labels_{split}.csv", ["VolumeName", *CT_FINDINGS], labels_rows)
        _write_csv(ct / f"reports_{split}.csv", ["VolumeName", "Findings_EN", "Impressions_EN"], report_rows)
    _write_csv(ct / "metadata.csv", ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"], meta)
    return counts

# -----------------------------------------------------------------------------
# build once, atomically


def _manifest(seed, scale, image_counts=None, ct_counts=None):
    m = {"version": VERSION, "seed": int(seed), "scale": float(scale)}
    if image_counts is not None:
        m.update(images=image_counts, ct=ct_counts, classnames=CLASSNAMES, findings=FINDINGS,
                 ct_findings=CT_FINDINGS)
    return m


def _is_current(root, seed, scale):
    """True when root holds a finished demo of this version, seed and scale."""
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return {k: m.get(k) for k in ("version", "seed", "scale")} == _manifest(seed, scale)


def build_demo(root, seed=0, scale=1.0):
    """Write the whole demo into `root` (which must not exist). Returns the manifest dict."""
    root = Path(root)
    root.mkdir(parents=True)
    image_counts = build_images(root, seed, scale)
    ct_counts = build_ct(root, seed, scale)
    manifest = _manifest(seed, scale, image_counts, ct_counts)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # written last: marks "finished"
    return manifest


def ensure_demo(root=DEFAULT_ROOT, seed=0, force=False, scale=1.0):
    """
    Path to the demo data, building it first if it is missing, unfinished, or from another version/seed/scale
    (or force=True). Relative roots are relative to the repository root. The build goes to a temporary
    sibling folder that is renamed into place, so an interrupted build never leaves a half-written demo.
    """
    root = resolve_root(root)
    if not force and _is_current(root, seed, scale):
        return root
    print(f"building the synthetic demo data in {root} (seed {seed}, scale {scale}; ~35 s, once)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_demo(tmp, seed, scale)
        if not force and _is_current(root, seed, scale):
            return root  # another process finished the same build meanwhile; keep its copy (tmp is removed below)
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.replace(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            # another process renamed its own build into place first; fine if it is the one we wanted
            if not _is_current(root, seed, scale):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the synthetic demo data set.")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="output folder; relative = relative to the repo root")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of images/volumes by this")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date demo exists")
    args = parser.parse_args()
    t0 = time.time()
    path = ensure_demo(args.root, args.seed, args.force, args.scale)
    m = json.loads((path / "manifest.json").read_text())
    print(f"demo data in {path} (built in {time.time() - t0:.1f} s)" if time.time() - t0 > 0.5 else
          f"demo data in {path} (already up to date; --force rebuilds it)")
    print(f"images per split {m['images']}, CT volumes per split {m['ct']}")
