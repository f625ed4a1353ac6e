"""
CT volumes: a NIfTI-1 reader/writer (numpy + gzip, no nibabel) and the CT-CLIP preprocessing.

Why our own reader: nibabel would be a sixth runtime dependency, and the part of NIfTI-1 that CT datasets use
(one .nii/.nii.gz file, a 348-byte header, then a plain array) is about 100 lines. We read the header fields we
need, the data in the stored dtype, and hand back the scaling (scl_slope/scl_inter) without applying it, so the
caller decides which rescale to trust (see the CT-RATE v2 pitfall below).

Axis convention, used everywhere in this file: NIfTI stores voxels in Fortran order (x fastest), so read_nifti
returns an array indexed [x, y, z] and spacing tuples are (x, y, z) in mm, exactly what nibabel's get_fdata()
gives. CT-CLIP's target shape (480, 480, 240) and target spacing (0.75, 0.75, 1.5) are written in this (x, y, z)
order too; only at the very end preprocess_ct permutes to (z, x, y) as CT-CLIP does.

CT-CLIP preprocessing (scripts/data_inference_nii.py of ibrahimethemhamamci/CT-CLIP), one function per step:
    1. to_hu        HU = slope * raw + intercept          (RescaleSlope/RescaleIntercept of the metadata CSV)
    2. clip_hu      clip to [-1000, 1000]                  (inference clips before resampling, training after)
    3. resample     trilinear F.interpolate, align_corners=False, to size int(n * spacing / target_spacing)
    4. normalize    x / 1000 -> [-1, 1], float32
    5. crop_or_pad  centre crop or pad to (480, 480, 240) in (x, y, z), padding with -1
    6. permute      (x, y, z) -> (z, x, y) and add a channel: (1, 240, 480, 480) = (C, D, H, W)
No reorientation is done: CT-CLIP relies on CT-RATE's consistent orientation, and so do we.

Also here: the validation split by patient (split_validation), an in-memory subset of a CTVolumeDataset (CTPairs),
light 3-D augmentation (augment_volume), and the multi-label zero-shot metrics with CT-CLIP's threshold rule, F1
variants and a resampling bootstrap (choose_thresholds, f1_scores, zero_shot_report, format_report).

Usage:
    arr, hdr = read_nifti("data/demo/ct/train/train_1/train_1_a/train_1_a_1.nii.gz")   # arr (X, Y, Z) int16
    vol = preprocess_ct(arr, hdr["spacing"], *header_rescale(hdr))                     # (1, 240, 480, 480)
    ds = CTVolumeDataset("data/demo/ct", "data/demo/ct/labels_train.csv", "data/demo/ct/reports_train.csv",
                         metadata_csv="data/demo/ct/metadata.csv", target_shape=(64, 64, 32))
"""

import csv
import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import metrics as M
from common.data import DataError

# -----------------------------------------------------------------------------
# NIfTI-1

# NIfTI datatype code -> numpy dtype (the ones CT data actually uses; complex/RGB/int64 are rejected)
NIFTI_DTYPES = {
    2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64,
    256: np.int8, 512: np.uint16, 768: np.uint32,
}
DTYPE_CODES = {np.dtype(v): k for k, v in NIFTI_DTYPES.items()}
HEADER_SIZE = 348
VOX_OFFSET = 352  # 348-byte header + 4-byte extension flag (all zero: no extensions)


def _read_bytes(path):
    """Whole file as bytes, transparently gunzipped. Gzip is detected by its magic bytes, not the extension."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: NIfTI file not found")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    return raw


def read_nifti(path):
    """
    Read a single-file NIfTI-1 volume (.nii or .nii.gz). Returns (array, header):
      array   numpy array in the stored dtype, native byte order, indexed [x, y, z] (Fortran order on disk)
      header  dict with dim, datatype, bitpix, pixdim, spacing (x, y, z), vox_offset, scl_slope, scl_inter,
              magic, endian. No scaling is applied: use header_rescale(header) for the (slope, inter) pair.
    Raises DataError (naming the file) for anything we cannot read.
    """
    buf = _read_bytes(path)
    if len(buf) < HEADER_SIZE:
        raise DataError(f"{path}: truncated NIfTI file ({len(buf)} bytes, the header alone is {HEADER_SIZE})")
    # endianness: sizeof_hdr must read as 348 in exactly one of the two byte orders
    endian = None
    for e in "<>":
        if struct.unpack(e + "i", buf[:4])[0] == HEADER_SIZE:
            endian = e
    if endian is None:
        n_le = struct.unpack("<i", buf[:4])[0]
        hint = " (this looks like NIfTI-2, which is not supported)" if n_le == 540 else ""
        raise DataError(f"{path}: not a NIfTI-1 file: sizeof_hdr is {n_le}, expected {HEADER_SIZE}{hint}")
    magic = buf[344:348].rstrip(b"\x00").decode("latin-1")
    if magic == "ni1":
        raise DataError(f"{path}: this is the header of a two-file .hdr/.img NIfTI pair; only single-file "
                        f".nii/.nii.gz (magic 'n+1') is supported. Convert it to .nii.gz first.")
    if magic != "n+1":
        raise DataError(f"{path}: bad NIfTI-1 magic {magic!r}, expected 'n+1' (an ANALYZE 7.5 file?)")
    dim = struct.unpack(endian + "8h", buf[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", buf[70:74])
    pixdim = struct.unpack(endian + "8f", buf[76:108])
    vox_offset, scl_slope, scl_inter = struct.unpack(endian + "3f", buf[108:120])
    header = dict(dim=dim, datatype=datatype, bitpix=bitpix, pixdim=pixdim, spacing=tuple(pixdim[1:4]),
                  vox_offset=vox_offset, scl_slope=scl_slope, scl_inter=scl_inter, magic=magic, endian=endian)

    if datatype not in NIFTI_DTYPES:
        raise DataError(f"{path}: unsupported NIfTI datatype code {datatype}; supported: "
                        f"{', '.join(f'{k} ({np.dtype(v).name})' for k, v in NIFTI_DTYPES.items())}")
    dtype = np.dtype(NIFTI_DTYPES[datatype]).newbyteorder(endian)
    ndim = dim[0]
    if ndim == 4 and dim[4] == 1:
        ndim = 3  # a 4-D file with a single time point is a 3-D volume
    if ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume (dim[0] = 3, or 4 with one time point), got dim = {dim}")
    shape = tuple(int(d) for d in dim[1:4])
    if min(shape) < 1:
        raise DataError(f"{path}: bad dimensions {shape}")
    offset = int(vox_offset)
    if offset < HEADER_SIZE:
        raise DataError(f"{path}: vox_offset {vox_offset} is inside the header")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if len(buf) < offset + nbytes:
        raise DataError(f"{path}: truncated NIfTI file: {shape} {dtype.name} needs {offset + nbytes} bytes, "
                        f"found {len(buf)}")
    arr = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    arr = arr.reshape(shape, order="F").astype(dtype.newbyteorder("="))  # copy: writable, native byte order
    return arr, header


def header_rescale(header):
    """(slope, inter) from a read_nifti header. Per the NIfTI-1 standard scl_slope == 0 (or NaN) means 'no scaling'."""
    slope, inter = header["scl_slope"], header["scl_inter"]
    if slope == 0 or not math.isfinite(slope):
        return 1.0, 0.0
    return float(slope), float(inter if math.isfinite(inter) else 0.0)


def write_nifti(path, array, spacing=(1.0, 1.0, 1.0), slope=1.0, inter=0.0):
    """
    Write a 3-D array indexed [x, y, z] as a single-file little-endian NIfTI-1 (gzipped if path ends in .gz).
    spacing is (x, y, z) in mm; slope/inter go into scl_slope/scl_inter (meaning HU = slope * stored + inter).
    The bytes are deterministic (gzip mtime 0, no file name in the gzip header), so re-running gives the same file.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise DataError(f"{path}: write_nifti expects a 3-D [x, y, z] array, got shape {array.shape}")
    dt = array.dtype.newbyteorder("=") if array.dtype.byteorder not in "=|" else array.dtype
    if np.dtype(dt) not in DTYPE_CODES:
        raise DataError(f"{path}: cannot write dtype {array.dtype}; use one of "
                        f"{sorted(np.dtype(d).name for d in DTYPE_CODES)}")
    code = DTYPE_CODES[np.dtype(dt)]
    le = np.dtype(dt).newbyteorder("<")
    sx, sy, sz = (float(s) for s in spacing)

    hdr = bytearray(HEADER_SIZE)
    struct.pack_into("<i", hdr, 0, HEADER_SIZE)
    struct.pack_into("<8h", hdr, 40, 3, *array.shape, 1, 1, 1, 1)
    struct.pack_into("<2h", hdr, 70, code, le.itemsize * 8)
    struct.pack_into("<8f", hdr, 76, 1.0, sx, sy, sz, 1.0, 1.0, 1.0, 1.0)  # pixdim[0] = qfac = 1
    struct.pack_into("<3f", hdr, 108, float(VOX_OFFSET), float(slope), float(inter))
    hdr[123] = 2  # xyzt_units: NIFTI_UNITS_MM
    # orientation: a plain scaling affine, given both as qform (identity quaternion) and sform (scanner coords)
    struct.pack_into("<2h", hdr, 252, 1, 1)
    struct.pack_into("<12f", hdr, 280, sx, 0, 0, 0, 0, sy, 0, 0, 0, 0, sz, 0)
    hdr[344:348] = b"n+1\x00"

    data = array.astype(le, copy=False).tobytes(order="F")  # x fastest on disk
    payload = bytes(hdr) + b"\x00" * 4 + data
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
                gz.write(payload)
        else:
            f.write(payload)
    return path

# -----------------------------------------------------------------------------
# CT-CLIP preprocessing, one step per function. Volumes are [x, y, z] unless said otherwise.

def to_hu(raw, slope, inter):
    """Stored values -> Hounsfield units: HU = slope * raw + inter, as float32."""
    # NOTE CT-RATE v2 pitfall (CT-CLIP issue #50): v2 volumes already hold HU, but the metadata CSV still lists
    # RescaleSlope/RescaleIntercept (e.g. 1 / -1024). Applying them again shifts everything by -1024 HU and the
    # clip then flattens the lungs to -1000. For v2 pass slope=1, inter=0 (CTVolumeDataset(rescale="header")).
    return np.asarray(raw, dtype=np.float32) * np.float32(slope) + np.float32(inter)


def clip_hu(x, lo=-1000.0, hi=1000.0):
    """Clip HU to [lo, hi]; CT-CLIP uses [-1000, 1000] (an older script used [-1000, 200], issue #41)."""
    if torch.is_tensor(x):
        return x.clamp(lo, hi)
    return np.clip(x, lo, hi)


def resample(vol, spacing, target_spacing):
    """
    Trilinear resampling of a 3-D volume from voxel spacing `spacing` to `target_spacing` (same axis order as vol).
    New size per axis = int(n * spacing / target_spacing): CT-CLIP truncates with int(), it does not round, so a
    64-voxel axis at 0.7 mm becomes int(59.73) = 59 voxels at 0.75 mm. Returns a float32 torch tensor.
    """
    # CT-CLIP does this in float64 (get_fdata); float32 halves the memory of a 512x512x300 volume and changes
    # the result by ~1e-7 relative, far below the 1/1000 HU quantisation that follows.
    vol = vol.float() if torch.is_tensor(vol) else torch.from_numpy(np.require(vol, np.float32, ["C", "W"]))
    size = [int(n * s / t) for n, s, t in zip(vol.shape, spacing, target_spacing)]
    if min(size) < 1:
        raise DataError(f"resample: spacing {tuple(spacing)} -> {tuple(target_spacing)} shrinks {tuple(vol.shape)} to {size}")
    if list(vol.shape) == size:
        return vol  # align_corners=False at scale 1 is exactly the identity; skip the work
    out = F.interpolate(vol[None, None], size=size, mode="trilinear", align_corners=False)  # (1, 1, X', Y', Z')
    return out[0, 0]


def normalize(x):
    """HU in [-1000, 1000] -> [-1, 1] float32, CT-CLIP's x / 1000."""
    if torch.is_tensor(x):
        return (x / 1000.0).float()
    return (np.asarray(x) / 1000.0).astype(np.float32)


def crop_or_pad(vol, target_shape, fill=-1.0):
    """
    Centre crop and/or pad each axis to target_shape, padding with `fill` (-1 = air after normalisation).
    Same arithmetic as CT-CLIP: crop start (n - t) // 2, then pad before (t - n) // 2 and the rest after,
    so an odd surplus goes to the end in both cases.
    """
    vol = torch.as_tensor(vol)
    slices = []
    for n, t in zip(vol.shape, target_shape):
        start = max((n - t) // 2, 0)
        slices.append(slice(start, min(start + t, n)))
    vol = vol[tuple(slices)]
    pad = []
    for n, t in zip(reversed(vol.shape), reversed(target_shape)):  # F.pad wants the last axis first
        before = (t - n) // 2
        pad += [before, t - n - before]
    return F.pad(vol, pad, value=fill)


def preprocess_ct(array, spacing, slope=1.0, inter=0.0, target_spacing=(0.75, 0.75, 1.5),
                  target_shape=(480, 480, 240), clip_before_resample=True):
    """
    CT-CLIP preprocessing of one raw volume. array is [x, y, z] as read_nifti returns it, spacing (x, y, z) mm,
    slope/inter the rescale to HU (see the v2 pitfall in to_hu), target_* in (x, y, z).
    Returns a float32 tensor (1, D, H, W) = (1, z, x, y), e.g. (1, 240, 480, 480) with the defaults.
    clip_before_resample=True is the inference script's order; CT-CLIP's training script clipped after.
    """
    hu = to_hu(array, slope, inter)                                       # (X, Y, Z) float32 HU
    if clip_before_resample:
        hu = clip_hu(hu)
    vol = resample(hu, spacing, target_spacing)                           # (X', Y', Z')
    if not clip_before_resample:
        vol = clip_hu(vol)
    vol = normalize(vol)
    vol = crop_or_pad(vol, target_shape, fill=-1.0)                       # (X, Y, Z) = target_shape
    return vol.permute(2, 0, 1).unsqueeze(0).contiguous()                 # (1, Z, X, Y)

# -----------------------------------------------------------------------------
# Dataset in the CT-RATE layout

def _read_csv(path, required):
    """Rows of a CSV as dicts, checking the file exists and has the required columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in required if c not in cols]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {cols}")
        return cols, list(reader)


def parse_xy_spacing(s, where=""):
    """CT-RATE's XYSpacing is a string like "[0.75, 0.75]"; CT-CLIP uses its first element for both x and y."""
    try:
        return float(str(s).strip().strip("[]()").split(",")[0])
    except ValueError:
        raise DataError(f"{where}: cannot parse XYSpacing {s!r}, expected something like '[0.75, 0.75]'") from None


def _clean_report(text):
    """CT-CLIP's text cleanup: drop quotes and parentheses; 'Not given.' (CT-RATE's empty field) becomes ''."""
    text = "" if text is None or text.strip() == "Not given." else text.strip()
    for ch in "\"'()":
        text = text.replace(ch, "")
    return text


class CTVolumeDataset(torch.utils.data.Dataset):
    """
    CT volumes with multi-label findings and reports, in CT-RATE's CSV layout.

    root          folder searched recursively for <VolumeName> files (flat, or CT-RATE's nested
                  <split>_<patient>/<split>_<patient>_<scan>/<VolumeName> layout; both work)
    labels_csv    VolumeName, then one 0/1 column per finding in column order (CT-RATE's multi-abnormality CSV)
    reports_csv   optional; VolumeName, Findings_EN, Impressions_EN. report_fields picks which text to use:
                  CT-CLIP's training effectively used Findings_EN only (data.py overwrites the concatenation),
                  its inference concatenates both.
    metadata_csv  optional; VolumeName, RescaleSlope, RescaleIntercept, XYSpacing ("[0.75, 0.75]"), ZSpacing.
                  When given, spacing comes from it; the rescale too unless rescale="header".
                  Without it, spacing is the header's pixdim and the rescale the header's scl_slope/scl_inter.
    rescale       "metadata" (default when metadata_csv is given) applies RescaleSlope/RescaleIntercept to the
                  stored values, "header" uses scl_slope/scl_inter, "none" takes stored values as HU.
                  Use "header" (or "none") for CT-RATE v2, whose volumes are already in HU (issue #50).
    Item: {"volume": (1, D, H, W) float32, "labels": (C,) float32, "report": str, "name": str}
    """

    def __init__(self, root, labels_csv, reports_csv=None, target_spacing=(0.75, 0.75, 1.5),
                 target_shape=(480, 480, 240), metadata_csv=None, rescale=None,
                 report_fields=("Findings_EN",), clip_before_resample=True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: CT data folder not found")
        self.target_spacing, self.target_shape = tuple(target_spacing), tuple(target_shape)
        self.clip_before_resample = clip_before_resample
        self.rescale = rescale or ("metadata" if metadata_csv else "header")
        if self.rescale not in ("metadata", "header", "none"):
            raise DataError(f"rescale must be 'metadata', 'header' or 'none', got {self.rescale!r}")
        if self.rescale == "metadata" and not metadata_csv:
            raise DataError("rescale='metadata' needs metadata_csv")

        cols, rows = _read_csv(labels_csv, ["VolumeName"])
        if cols[0] != "VolumeName" or len(cols) < 2:
            raise DataError(f"{labels_csv}: expected VolumeName as the first column followed by finding columns, got {cols}")
        self.findings = cols[1:]
        if not rows:
            raise DataError(f"{labels_csv}: no volumes listed")
        self.names, labels = [], []
        for i, r in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
            try:
                vals = [float(r[c]) for c in self.findings]
            except (TypeError, ValueError):
                raise DataError(f"{labels_csv} line {i}: finding values must be 0 or 1, got "
                                f"{[r[c] for c in self.findings]}") from None
            if any(v not in (0.0, 1.0) for v in vals):
                raise DataError(f"{labels_csv} line {i}: finding values must be 0 or 1, got {vals}")
            self.names.append(r["VolumeName"])
            labels.append(vals)
        self.labels = np.asarray(labels, dtype=np.float32)  # (N, C)

        self.reports = {}
        if reports_csv:
            _, rrows = _read_csv(reports_csv, ["VolumeName", *report_fields])
            for r in rrows:
                parts = [_clean_report(r[c]) for c in report_fields]
                self.reports[r["VolumeName"]] = " ".join(p for p in parts if p)

        self.meta = {}
        if metadata_csv:
            _, mrows = _read_csv(metadata_csv, ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"])
            for i, r in enumerate(mrows, start=2):
                where = f"{metadata_csv} line {i}"
                xy = parse_xy_spacing(r["XYSpacing"], where)
                try:
                    self.meta[r["VolumeName"]] = dict(slope=float(r["RescaleSlope"]), inter=float(r["RescaleIntercept"]),
                                                      spacing=(xy, xy, float(r["ZSpacing"])))
                except ValueError:
                    raise DataError(f"{where}: RescaleSlope/RescaleIntercept/ZSpacing must be numbers, got "
                                    f"{r['RescaleSlope']!r}, {r['RescaleIntercept']!r}, {r['ZSpacing']!r}") from None
            missing = [n for n in self.names if n not in self.meta]
            if missing:
                raise DataError(f"{metadata_csv}: no metadata row for {len(missing)} volume(s), e.g. {missing[:3]}")

        # one recursive scan, then a name -> path lookup (CT-RATE nests volumes two folders deep)
        found = {}
        for dirpath, _, files in os.walk(self.root):
            for fn in files:
                if fn.endswith((".nii", ".nii.gz")):
                    found.setdefault(fn, Path(dirpath) / fn)
        missing = [n for n in self.names if n not in found]
        if missing:
            raise DataError(f"{self.root}: {len(missing)} volume(s) listed in {labels_csv} not found under it, "
                            f"e.g. {missing[:3]}")
        self.paths = [found[n] for n in self.names]

    def __len__(self):
        return len(self.names)

    def load_hu_input(self, idx):
        """(raw array [x, y, z], spacing (x, y, z), slope, inter) for item idx, before any preprocessing."""
        name = self.names[idx]
        arr, hdr = read_nifti(self.paths[idx])
        spacing = self.meta[name]["spacing"] if name in self.meta else hdr["spacing"]
        if self.rescale == "metadata":
            slope, inter = self.meta[name]["slope"], self.meta[name]["inter"]
        elif self.rescale == "header":
            slope, inter = header_rescale(hdr)
        else:
            slope, inter = 1.0, 0.0
        return arr, spacing, slope, inter

    def __getitem__(self, idx):
        arr, spacing, slope, inter = self.load_hu_input(idx)
        try:
            volume = preprocess_ct(arr, spacing, slope, inter, self.target_spacing, self.target_shape,
                                   self.clip_before_resample)             # (1, D, H, W)
        except DataError as e:  # e.g. a volume so small or a spacing so odd that resampling leaves nothing
            raise DataError(f"{self.paths[idx]}: {e}") from None
        if not np.isfinite(volume.numpy()).all():
            raise DataError(f"{self.paths[idx]}: the volume holds NaN or infinite values (after the rescale "
                            f"to HU with slope {slope}, intercept {inter})")
        name = self.names[idx]
        return {"volume": volume, "labels": torch.from_numpy(self.labels[idx].copy()),
                "report": self.reports.get(name, ""), "name": name}

# -----------------------------------------------------------------------------
# CT-RATE patients and the validation split, the in-memory pair set, light augmentation


def patient_of(name: str) -> str:
    """train_12_a_1.nii.gz -> train_12 (CT-RATE: <split>_<patient>_<scan>_<reconstruction>)."""
    return name.split(".nii")[0].rsplit("_", 2)[0]


def split_validation(names, frac: float) -> tuple:
    """(train indices, validation indices): a fixed `frac` of the training PATIENTS (by a hash of the patient id,
    so the split does not depend on --seed or on file order) is held out for choosing thresholds. Ours: the
    official protocol picks them on the test set itself."""
    patients = sorted({patient_of(n) for n in names}, key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    val = set(patients[:max(1, round(frac * len(patients)))])
    is_val = [patient_of(n) in val for n in names]
    return [i for i, v in enumerate(is_val) if not v], [i for i, v in enumerate(is_val) if v]


def augment_volume(vol):
    """--augment (ours; the paper shows augmented slices, not how): a left-right flip with p 0.5 and an
    intensity jitter x (1 +- 0.1) +- 0.05 in CT-CLIP's [-1, 1] units. NOTE the flip swaps "left" and "right"
    in what the report describes; keep it off for reports that name sides often."""
    if torch.rand(()) < 0.5:
        vol = vol.flip(-2)                                                              # (1, z, x, y): x = left-right
    a, b = (torch.rand(2) * 2 - 1) * torch.tensor([0.1, 0.05])
    return (vol * (1 + a) + b).clamp(-1, 1)


class CTPairs(torch.utils.data.Dataset):
    """Items of a CTVolumeDataset (volume, labels, report) restricted to `indices`. Volumes small enough (the
    demo's 0.5 MB) are preprocessed once and kept in memory: resampling is most of a tiny model's step."""

    def __init__(self, base, indices, augment: bool = False):
        self.base, self.indices, self.augment = base, list(indices), augment
        self.findings = base.findings
        self.labels = base.labels[self.indices]                                         # (N, C)
        self.cache = {} if math.prod(base.target_shape) <= 2 ** 18 else None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        item = self.cache.get(j) if self.cache is not None else None
        if item is None:
            item = self.base[j]                       # a DataError here names the file (common/ct.py)
            if self.cache is not None:
                self.cache[j] = item
        vol = augment_volume(item["volume"]) if self.augment else item["volume"]
        return {"volume": vol, "labels": item["labels"], "report": item["report"]}

# -----------------------------------------------------------------------------
# Multi-label zero-shot metrics: CT-CLIP's thresholds, the F1 variants, bootstrap CIs that resample, the table


def choose_thresholds(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per finding, CT-CLIP's rule (bootstrap_values.py: find_threshold): of the 100 thresholds linspace(0, 1),
    the one whose (FPR, TPR) is nearest to (0, 1), predicting prob > t; ties go to the larger t."""
    grid = np.linspace(0, 1, 100)
    out = []
    for c in range(y.shape[1]):
        pred = probs[:, c][None, :] > grid[:, None]                                    # (100, N)
        pos, neg = y[:, c] == 1, y[:, c] == 0
        tpr = (pred & pos).sum(1) / max(pos.sum(), 1)
        fpr = (pred & neg).sum(1) / max(neg.sum(), 1)
        d = np.sqrt((1 - tpr) ** 2 + fpr ** 2)
        out.append(grid[len(d) - 1 - np.argmin(d[::-1])])                              # last minimum
    return np.asarray(out)


def f1_scores(y: np.ndarray, pred: np.ndarray) -> dict:
    """y, pred (N, C) 0/1. macro: mean over findings of the positive-class F1; weighted: the same weighted by each
    finding's positives (sklearn average="weighted"); samples: F1 of each volume's finding set, averaged
    (sklearn "samples", an empty-vs-empty volume scoring 0); ctclip_weighted: the official per-finding
    f1_score(average="weighted") over the classes {0, 1}, averaged over findings. Zero divisions give 0."""
    tp, fp, fn = (y * pred).sum(0), ((1 - y) * pred).sum(0), (y * (1 - pred)).sum(0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=(2 * tp + fp + fn) > 0)
    tn = ((1 - y) * (1 - pred)).sum(0)
    f1_neg = np.divide(2 * tn, 2 * tn + fp + fn, out=np.zeros(len(tn)), where=(2 * tn + fp + fn) > 0)
    pos = y.sum(0)
    stp, sden = (y * pred).sum(1), y.sum(1) + pred.sum(1)
    return {"f1": f1, "macro_f1": float(f1.mean()),
            "weighted_f1": float((f1 * pos).sum() / pos.sum()) if pos.sum() else 0.0,
            "samples_f1": float(np.mean(np.divide(2 * stp, sden, out=np.zeros(len(y)), where=sden > 0))),
            "ctclip_weighted_f1": float(((f1 * pos + f1_neg * (len(y) - pos)) / len(y)).mean())}


def summary(y, probs, thresholds) -> dict:
    """The scalar metrics of a zero-shot run (a function of rows, so the bootstrap can resample it)."""
    pred = (probs > thresholds).astype(np.float64)
    f1 = f1_scores(y, pred)
    return {"mean_auroc": M.auroc(y, probs), "accuracy": float((pred == y).mean()),
            **{k: v for k, v in f1.items() if k != "f1"}}


def zero_shot_report(y, probs, thresholds, findings, n_boot: int, seed: int) -> dict:
    """Per-finding table and overall metrics with percentile bootstrap 95% CIs over volumes: every resample
    draws volumes with replacement (the official script's "bootstrap" reuses the same rows 1000 times)."""
    y, probs = np.asarray(y, np.float64), np.asarray(probs, np.float64)
    pred = (probs > thresholds).astype(np.float64)
    per_auc, f1 = M.auroc(y, probs, average=None), f1_scores(y, pred)
    rows = [{"finding": f, "n_pos": int(y[:, c].sum()), "auroc": float(per_auc[c]), "threshold": float(thresholds[c]),
             "accuracy": float((pred[:, c] == y[:, c]).mean()), "f1": float(f1["f1"][c])}
            for c, f in enumerate(findings)]
    overall = summary(y, probs, thresholds)
    ci = {}
    for k in overall:
        _, lo, hi = M.bootstrap_ci(lambda a, b: summary(a, b, thresholds)[k], y, probs, n=n_boot, seed=seed)
        ci[k] = [lo, hi]
    return {"overall": overall, "ci95": ci, "per_finding": rows, "n": len(y)}


def format_report(rep: dict, title: str) -> str:
    lines = [f"{title} (n = {rep['n']} volumes; thresholds from {rep['thresholds_from']})",
             f"  {'finding':36s} {'pos':>5s} {'AUROC':>7s} {'thr':>6s} {'acc':>7s} {'F1':>7s}"]
    for r in rep["per_finding"]:
        lines.append(f"  {r['finding']:36s} {r['n_pos']:5d} {r['auroc']:7.4f} {r['threshold']:6.3f} "
                     f"{r['accuracy']:7.4f} {r['f1']:7.4f}")
    for k, v in rep["overall"].items():
        lo, hi = rep["ci95"][k]
        lines.append(f"  {k:20s} {v:.4f}  (95% CI {lo:.4f} - {hi:.4f})")
    return "\n".join(lines)
