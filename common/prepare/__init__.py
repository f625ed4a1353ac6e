"""Turn each dataset's official download into this project's on-disk formats.

    python -m common.prepare --list
    python -m common.prepare isic --src ~/downloads/isic2018            # -> data/isic/
    python -m common.prepare mimic-cxr --src /big/mimic-cxr-jpg --out /fast/mimic

You download a dataset from its official source and unpack it anywhere. One command then reads the official
layout (and only what it needs), checks it, and writes data/NAME/ in the formats common/data.py and
common/ct.py read: a split JSON for classification or segmentation (PNG masks), image-report CSVs,
CheXpert-style multi-label CSVs, or CT volumes plus CSVs. A prepare.json records the source, the seed, the
counts per split and class, and the paper's counts next to ours. See data/README.md for every dataset's source, access terms and raw layout.

Layout of this package: util.py holds what every converter shares (reading, splitting, the atomic output
folder, the image check, prepare.json); one module per dataset family holds its converters, class names and the
papers' counts (derm, fundus, endoscopy, pathology, ultrasound, cxr, chexpert, rsna, siim, mimic, ct_rate).
CONVERTERS below is the registry: a new dataset is a function `prepare_x(src, out, *, seed=0, **opts)` in a
family module (it writes through `with Output(out, root, seed=seed, **opts) as o:` and ends with
`finish(o, name, summary, paper)`) plus one line here.

How images are referenced. Every converter writes paths relative to data/NAME. Files that are used as they
are (JPEG/PNG/NIfTI) are reached through data/NAME/raw, a symlink to the --src folder, so a split file says
"raw/ISIC2018_Task3_Training_Input/ISIC_0024306.jpg" and stays valid whatever machine or folder the raw data
sits in: move the raw data, re-point one symlink. With --copy (or --max-side N) data/NAME/raw is a real folder
holding copies (or copies resized so the longer side is at most N) under the same relative paths, so the
split files do not change. Files that must be converted (DermaMNIST arrays, RSNA / SIIM DICOMs) go to
data/NAME/images/, masks to data/NAME/masks/.

Guarantees, because a half-written dataset is worse than none:
- the source is never modified;
- everything is written into a hidden sibling folder and renamed into place at the end, so an interrupted run
  (an error, Ctrl-C, SIGTERM) leaves data/NAME untouched, and a hard kill's leftover is deleted by the next run;
- every image it publishes is decoded first (--no-verify skips it): a truncated download fails here, naming
  the files, not hours into training;
- an existing data/NAME with a prepare.json is left alone (idempotent); --force rebuilds it, and replaces only
  a folder prepare made for the same dataset (never a user's folder or a file);
- repeated label rows are dropped and said, contradictory ones refused; a split without its ground truth and
  a class with no training image are warnings (printed, and kept in prepare.json);
- a wrong --src raises DataError naming the files that were expected; `main` prints it and exits with 2.
"""
import argparse
import importlib
import json
import signal
import sys
import threading
from pathlib import Path

from common.data import DataError
from common.prepare.util import (VERSION, allocate, counts_table, stratified_split)  # noqa: F401 (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]

# The registry: dataset name -> "module:function" in this package. A new converter is one line here.
CONVERTERS = {
    "isic": "derm:prepare_isic",
    "dermamnist": "derm:prepare_dermamnist",
    "derm7pt": "derm:prepare_derm7pt",
    "aptos2019": "fundus:prepare_aptos2019",
    "kvasir": "endoscopy:prepare_kvasir",
    "pneumonia": "cxr:prepare_pneumonia",
    "cpn-x-ray": "cxr:prepare_cpn_x_ray",
    "chaoyang": "pathology:prepare_chaoyang",
    "fetal-us": "ultrasound:prepare_fetal_us",
    "adam": "fundus:prepare_adam",
    "odir": "fundus:prepare_odir",
    "chexpert": "chexpert:prepare_chexpert",
    "rsna": "rsna:prepare_rsna",
    "embed": "embed:prepare_embed",
    "mimic-cxr": "mimic:prepare_mimic_cxr",
    "ct-rate": "ct_rate:prepare_ct_rate",
    "covidx": "cxr:prepare_covidx",
    "siim": "siim:prepare_siim",
    "rsna-seg": "rsna:prepare_rsna_seg",
    "chexpert8x200": "chexpert:prepare_chexpert8x200",
}


def module_of(name):
    """The family module that holds the converter for dataset `name`."""
    return importlib.import_module(f"common.prepare.{CONVERTERS[name].split(':')[0]}")


def converter(name):
    """The converter function for dataset `name` (DataError for an unknown name)."""
    if name not in CONVERTERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(CONVERTERS)}")
    return getattr(module_of(name), CONVERTERS[name].split(":")[1])


# Class names of every classification dataset in label order, gathered from the family modules (each keeps
# its own next to its converter); cilmp.py's DATASETS must agree with these (tests/test_prepare.py checks).
CLASSNAMES = {k: v for name in CONVERTERS for k, v in getattr(module_of(name), "CLASSNAMES", {}).items()}


def default_out(name):
    return REPO_ROOT / "data" / name


def made_by_prepare(out):
    """The prepare.json of a folder this module wrote, or None (no folder, a file, a user's folder)."""
    marker = Path(out) / "prepare.json"
    if Path(out).is_symlink() or not Path(out).is_dir() or not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"dataset", "project_version"} <= set(record) else None


def run(name, src, out=None, *, seed=0, copy=False, max_side=None, force=False, verify=True):
    """Convert unless data/NAME is already prepared (then return its prepare.json); --force rebuilds a folder
    that prepare made (its prepare.json marks it) and refuses anything else."""
    convert = converter(name)
    src = Path(src).expanduser()
    if not src.exists():
        raise DataError(f"{name}: source {src} does not exist")
    out = Path(out).expanduser() if out else default_out(name)
    if out.exists() or out.is_symlink():
        record = made_by_prepare(out)
        if record is None:
            what = "a file" if out.is_file() else "a symlink" if out.is_symlink() else "a folder prepare did not make"
            raise DataError(f"--out {out} exists and is {what} (no prepare.json from common.prepare); it is never "
                            f"replaced, even with --force: remove it yourself or choose another --out")
        if record["dataset"] != name:
            raise DataError(f"--out {out} holds the prepared dataset {record['dataset']!r}, not {name!r}; "
                            f"choose another --out (or remove it yourself)")
        if not force:
            print(f"{out} is already prepared (prepare.json); --force rebuilds it")
            return record
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise DataError(f"--out {out} is inside --src {src}: the source is never modified; choose another --out")
    if o in s.parents:
        raise DataError(f"--src {src} is inside --out {out}, which a rebuild replaces; move the download first")
    return convert(src, out, seed=seed, copy=copy, max_side=max_side, verify=verify)


def _terminate(signum, frame):
    print("terminated: nothing was published", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("name", nargs="?", help="dataset name (see --list)")
    ap.add_argument("--src", help="the folder the official download was unpacked into")
    ap.add_argument("--out", help="output folder (default: data/NAME in the repository)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the splits the papers do not fix")
    ap.add_argument("--copy", action="store_true", help="copy the images instead of symlinking the source")
    ap.add_argument("--max-side", type=int, default=None, help="copy images shrunk so the longer side is <= N")
    ap.add_argument("--force", action="store_true", help="rebuild an output folder that prepare made")
    ap.add_argument("--no-verify", action="store_true", help="skip checking that every image decodes")
    ap.add_argument("--list", action="store_true", help="list the datasets")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for n in CONVERTERS:
            print(f"{n:<14} {converter(n).__doc__.splitlines()[0]}")
        return 0
    if not args.src:
        ap.error("--src is required")
    # SIGTERM (a cluster job's time limit, `kill`) becomes SystemExit, so the hidden partial folder is removed
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() works only there
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        summary = run(args.name, args.src, args.out, seed=args.seed, copy=args.copy, max_side=args.max_side,
                      force=args.force, verify=not args.no_verify)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print("\n".join(counts_table(summary)))
    for k, v in summary.get("skipped", {}).items():
        if v:
            print(f"skipped ({k}): {v}")
    for note in summary.get("notes", []):
        print(f"note: {note}")
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")
    return 0
