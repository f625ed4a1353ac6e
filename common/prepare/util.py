"""What every converter shares: reading the official files, seeded splits, and the atomic output folder.

A converter (one function per dataset, in the family modules next to this one) reads the download with
find_dir / find_file / read_csv, splits with stratified_split when the paper fixes no split, and writes
through Output, which builds everything in a hidden sibling folder and renames it into place at the end.
finish() writes prepare.json, the record that marks a folder as made by prepare.
"""
import csv
import datetime
import gzip
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import DataError
from common.run import Progress

VERSION = "0.1.0"  # the project version recorded in every prepare.json
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# ----------------------------------------------------------------------------------------------------------
# reading the source


def find_dir(src, candidates, dataset, expected, marker=None):
    """First src/<candidate> folder (holding `marker`, when given); DataError naming what was expected otherwise.

    The candidates cover the usual ways an archive unpacks (with or without its top folder)."""
    for c in candidates:
        p = src / c if c else src
        if p.is_dir() and (marker is None or (p / marker).exists()):
            return p
    raise DataError(f"{dataset}: {src} does not look like the official download: expected {expected}. "
                    f"Point --src at the folder you unpacked it into (see data/README.md).")


def find_file(src, candidates, dataset, expected):
    """First of src/<candidate> that is a file (a candidate may be a glob); DataError otherwise."""
    for c in candidates:
        hits = sorted(src.glob(c)) if any(ch in c for ch in "*?[") else [src / c]
        for p in hits:
            if p.is_file():
                return p
    raise DataError(f"{dataset}: {src} does not look like the official download: expected {expected}. "
                    f"Point --src at the folder you unpacked it into (see data/README.md).")


def read_csv(path, required=(), delimiter=None, unique=None, warnings=None):
    """Rows of a CSV (or .csv.gz) as dicts with stripped header names; DataError on missing columns.

    unique: the column(s) that name one item (e.g. ("image",)). A repeated row, identical to an earlier one,
    is dropped and said in `warnings` (a list the summary carries); a repeat with other values is a DataError
    (the labels contradict each other, so no choice would be right)."""
    path = Path(path)
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    text = raw.decode("utf-8-sig", errors="replace")
    if delimiter is None:  # FETAL_PLANES_DB is ';'-separated; sniff from the header line only
        header = text.split("\n", 1)[0]
        delimiter = ";" if header.count(";") > header.count(",") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {header}")
    rows = []
    for values in reader:
        if not values or all(not v.strip() for v in values):
            continue
        rows.append({h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)})
    return dedupe(rows, unique, path, warnings) if unique else rows


def dedupe(rows, key, where, warnings=None):
    """rows without repeats of an earlier row (same `key` columns, same values); see read_csv."""
    first, kept, dropped = {}, [], []
    for r in rows:
        k = tuple(r[c] for c in key)
        if k not in first:
            first[k] = r
            kept.append(r)
        elif r == first[k]:
            dropped.append(k)
        else:
            diff = {c: (first[k][c], r[c]) for c in r if r[c] != first[k].get(c)}
            raise DataError(f"{where}: {'/'.join(key)} {'/'.join(k)!r} is listed twice with different values "
                            f"{diff} (first, second); fix the file")
    if dropped:
        show = ", ".join("/".join(k) for k in dropped[:3])
        msg = (f"{where}: {len(dropped)} duplicate row(s) dropped (the same {'/'.join(key)} and values as an "
               f"earlier row), e.g. {show}")
        if warnings is None:
            print(f"warning: {msg}")
        else:
            warnings.append(msg)
    return kept


def number(value, where, kind=float):
    """kind(value), or DataError naming where the bad cell is (no bare ValueError from deep inside)."""
    try:
        return kind(value)
    except ValueError:
        raise DataError(f"{where}: expected a number, got {value!r}") from None


def check_exists(paths, dataset, limit=5):
    """DataError listing (the first few) missing files: a partial download should fail before any writing."""
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{dataset}: {len(missing)} image file(s) named by the labels are missing, e.g. "
                        f"{missing[:limit]}; is the download complete?")


def list_images(folder):
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------
# splitting


def allocate(counts, n_take):
    """Split n_take over classes in proportion to counts, largest remainder first (sums exactly to n_take)."""
    total = sum(counts)
    exact = [c * n_take / total for c in counts]
    take = [int(x) for x in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - take[i]), i))
    for i in order[: n_take - sum(take)]:
        take[i] += 1
    return take


def stratified_split(labels, n_test, seed):
    """Seeded stratified split -> (train_idx, test_idx), each sorted; exactly n_test go to test.

    Per class, the members are permuted with numpy's PCG64 seeded by `seed` and the first k taken, k from
    `allocate`, so the same source and seed always give the same split on every machine.
    """
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    members = [np.flatnonzero(labels == c) for c in classes]
    take = allocate([len(m) for m in members], n_test)
    rng = np.random.default_rng(seed)
    test = []
    for m, k in zip(members, take):
        test.extend(m[rng.permutation(len(m))[:k]].tolist())
    test_set = set(test)
    train = [i for i in range(len(labels)) if i not in test_set]
    return train, sorted(test)


def split_70_15_15(labels, seed):
    """MGCA's proportions for RSNA and SIIM: 70% train, the rest halved into val and test; stratified here so
    every part keeps the class ratio (MGCA's split is not). -> {"train"|"val"|"test": [index, ...]}."""
    rest_n = round(len(labels) * 0.3)
    tr, rest = stratified_split(labels, rest_n, seed)
    va_local, te_local = stratified_split([labels[i] for i in rest], rest_n - rest_n // 2, seed + 1)
    return {"train": tr, "val": [rest[i] for i in va_local], "test": [rest[i] for i in te_local]}


def paper_test_size(p, n_total, fallback_frac):
    """How many go to test: the paper's test fraction (p = its {"train": n, "test": n}) applied to our total
    (the paper's count if the totals are equal); fallback_frac of the total when the paper gives no split."""
    if p.get("train") and p.get("test"):
        return round(n_total * p["test"] / (p["train"] + p["test"]))
    return round(n_total * fallback_frac)


# ----------------------------------------------------------------------------------------------------------
# long work: a thread pool and progress lines with an ETA


def parallel_map(fn, items, desc):
    """[fn(x) for x in items] in a thread pool (numpy, zlib and PIL work without the GIL), in order, with a
    progress line and an ETA. The first exception stops the work (queued items are dropped) and is raised."""
    items = list(items)
    bar = Progress(len(items), desc)
    results = []
    pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
    try:
        for r in pool.map(fn, items):
            results.append(r)
            bar.update()
    finally:  # also on Ctrl-C / SIGTERM: drop the queued items, wait for the running ones
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def progress(items, desc):
    """Iterate over items, printing a progress line with an ETA every 10 s (and at the end) for long loops."""
    items = list(items)
    bar = Progress(len(items), desc)
    for x in items:
        yield x
        bar.update()


# ----------------------------------------------------------------------------------------------------------
# writing: atomic output folder, image placement, split JSON, prepare.json


class Output:
    """The output folder being written. Everything goes to a hidden sibling, renamed into place on success.

    with Output(out, src, **opts) as o:  # opts: seed, copy, max_side, verify (the command-line options)
        rel = o.place(src_file)          # "raw/<path inside src>" (symlinked source, or a copy)
        o.write_json("split_x.json", obj)
        finish(o, name, summary, paper)  # copies, checks every image decodes, writes prepare.json; last
    """

    def __init__(self, out, src, *, seed=0, copy=False, max_side=None, verify=True, link_raw=True):
        # abspath, not resolve(): symlinks inside the download stay as they are (and it is cheap per image)
        self.out, self.src = Path(out), Path(os.path.abspath(src))
        self.seed, self.copy, self.max_side, self.verify = seed, copy or bool(max_side), max_side, verify
        self.link_raw = link_raw
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.files = []
        self.placed = {}  # "raw/<rel>" -> source file, copied / checked by publish() in a worker pool

    def __enter__(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.out)
        try:  # from the mkdir on: a signal can arrive at any point, and __exit__ does not run if __enter__ fails
            self.tmp.mkdir()
            if self.link_raw and not self.copy:
                try:
                    os.symlink(self.src, self.tmp / "raw", target_is_directory=True)
                except OSError as e:  # e.g. Windows without developer mode
                    raise DataError(f"cannot create the symlink {self.out / 'raw'} -> {self.src} ({e}); "
                                    f"pass --copy to copy the images instead") from None
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # includes KeyboardInterrupt / SystemExit: never leave a half-written dataset
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        try:
            if self.out.exists() or self.out.is_symlink():
                os.rename(self.out, trash)
            os.rename(self.tmp, self.out)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise DataError(f"cannot move the finished dataset into {self.out} ({e})") from None
        shutil.rmtree(trash, ignore_errors=True)
        return False

    def place(self, path):
        """Reference a source file from data/NAME -> "raw/<path inside src>". With --copy / --max-side the copy
        (shrunk) is made by publish(), which also checks that every image decodes."""
        path = Path(path)
        rel = Path(os.path.relpath(os.path.abspath(path), self.src))
        if rel.parts and rel.parts[0] == "..":
            raise DataError(f"{path} is outside the source folder {self.src}")
        ref = "raw/" + rel.as_posix()
        self.placed[ref] = path
        return ref

    def publish(self):
        """Make the copies (--copy / --max-side) and check that every placed image decodes (unless --no-verify),
        in a thread pool (PIL decodes without the GIL) with a progress line. DataError listing the broken files."""
        jobs = [(src, self.tmp / ref) for ref, src in self.placed.items()]
        if not jobs or not (self.copy or self.verify):
            return
        what = ("copying" + (" and checking" if self.verify else "")) if self.copy else "checking"

        def work(job):
            src, dst = job
            try:
                if self.copy:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if self.max_side and src.suffix.lower() in IMAGE_EXTS:
                        save_resized(src, dst, self.max_side)
                    else:
                        shutil.copyfile(src, dst)
            except (OSError, DataError) as e:
                return src, str(e)
            if self.verify and src.suffix.lower() in IMAGE_EXTS:
                problem = check_image(dst if self.copy else src)
                if problem:
                    return src, problem
            return None

        broken = [r for r in parallel_map(work, jobs, f"{what} {len(jobs)} images:") if r is not None]
        if broken:
            shown = "; ".join(f"{p} ({why})" for p, why in broken[:10])
            raise DataError(f"{len(broken)} of {len(jobs)} images cannot be read: {shown}"
                            + (f"; and {len(broken) - 10} more" if len(broken) > 10 else "")
                            + ". Re-download them" + (" (or pass --no-verify to publish them unchecked)"
                                                      if self.verify else ""))

    def save_image(self, relpath, array_or_image):
        """Write a converted image (uint8 array or PIL image) to data/NAME/<relpath>, shrunk to --max-side."""
        img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
        if self.max_side and max(img.size) > self.max_side:
            img = shrink(img, self.max_side)
        dst = self.tmp / relpath
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst)
        return relpath

    def save_mask(self, relpath, mask):
        """Write a segmentation mask (bool or 0/255 uint8 array (H, W)) as an 8-bit PNG (mode L, 0/255). With
        --max-side it is shrunk to exactly the size save_image gives its image, nearest-neighbour (stays 0/255)."""
        img = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), "L")
        if self.max_side and max(img.size) > self.max_side:
            img = img.resize(shrunk_size(img.size, self.max_side), Image.NEAREST)
        dst = self.tmp / relpath
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst)
        return relpath

    def write_json(self, name, obj):
        with open(self.tmp / name, "w") as f:
            json.dump(obj, f, indent=1)
        self.files.append(name)

    def write_csv(self, name, header, rows):
        with open(self.tmp / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        self.files.append(name)


def remove_leftovers(out):
    """Delete the hidden .partial / .old folders a killed run left next to `out` (not those of a live run)."""
    for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*"):
        for old in out.parent.glob(pattern):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue  # another prepare of the same folder is running right now
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def pid_alive(pid):
    """True when a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or we cannot tell: keep its folder)
    return True


def check_image(path):
    """None when the image file decodes completely, else the reason. The header is read by Image.open; the
    full decode catches truncated files (JPEGs decode at 1/8 scale via draft(): every byte of the entropy-coded
    data is still read, about 4x faster)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(e).__name__}: {e}"
    return None


def shrunk_size(size, max_side):
    """(w, h) scaled so the longer side is max_side, aspect kept."""
    w, h = size
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def shrink(img, max_side):
    """Resize so the longer side is max_side (bicubic, aspect kept)."""
    return img.resize(shrunk_size(img.size, max_side), Image.BICUBIC)


def save_resized(src, dst, max_side):
    """Copy an image, shrinking it when its longer side exceeds max_side (never enlarging)."""
    try:
        with Image.open(src) as img:
            if max(img.size) <= max_side:
                shutil.copyfile(src, dst)
                return
            img.load()
            small = shrink(img, max_side)
    except OSError as e:
        raise DataError(f"{src}: unreadable image ({e})") from None
    small.save(dst, quality=95) if dst.suffix.lower() in (".jpg", ".jpeg") else small.save(dst)


def split_json(name, items, classnames):
    """{"train": [[relpath, label, classname], ...], "val": ..., "test": ...} with checked labels."""
    out = {}
    for split in SPLITS:
        rows = items.get(split, [])
        for rel, label, cname in rows:
            if classnames[label] != cname:
                raise AssertionError(f"{name}: label {label} is {classnames[label]!r}, item says {cname!r}")
        out[split] = [[rel, int(label), cname] for rel, label, cname in rows]
    return out


def class_counts(split, classnames):
    """{split: {classname: n}} for a split dict, every class listed (0 when absent)."""
    return {s: {c: sum(1 for _, _, cn in rows if cn == c) for c in classnames} for s, rows in split.items()}


def write_classification(o, name, items, classnames, split_name=None, notes=(), warnings=()):
    """Write split_<name>.json and return the summary dict `finish` records (a warning per class that has no
    training image: a classifier can still be scored on it, but never learnt it)."""
    split = split_json(name, items, classnames)
    if not split["train"] or not split["test"]:
        raise DataError(f"{name}: empty split (train {len(split['train'])}, test {len(split['test'])}); "
                        f"is the source complete?")
    o.write_json(f"split_{split_name or name}.json", split)
    counts = class_counts(split, classnames)
    absent = [c for c in classnames if counts["train"][c] == 0]
    warnings = list(warnings) + ([f"split_{split_name or name}.json: no training image of class(es) {absent}; "
                                  f"is the source complete?"] if absent else [])
    return {"counts": counts, "classnames": classnames, "notes": list(notes), "warnings": warnings}



def write_seeded(name, src, out, paths, labels, names, n_test, note, paper, *, seed=0, warnings=(), **opts):
    """Seeded stratified train/test split of one labelled pool, n_test to test (val = []: the CILMP protocol
    has none), written as split_<name>.json."""
    tr, te = stratified_split(labels, n_test, seed)
    with Output(out, src, seed=seed, **opts) as o:
        items = {"train": [(o.place(paths[i]), labels[i], names[labels[i]]) for i in tr],
                 "val": [],
                 "test": [(o.place(paths[i]), labels[i], names[labels[i]]) for i in te]}
        summary = write_classification(o, name, items, names, notes=[note + f" (seed {seed})"], warnings=warnings)
        finish(o, name, summary, paper)
    return summary



def class_folders(root, folder_to_class, dataset):
    """(paths, labels) from class sub-folders; DataError naming the expected folders when any is missing."""
    paths, labels = [], []
    for folder, label in folder_to_class.items():
        d = root / folder
        if not d.is_dir():
            raise DataError(f"{dataset}: expected class folders {sorted(folder_to_class)} in {root}; "
                            f"{folder}/ is missing")
        files = list_images(d)
        paths += files
        labels += [label] * len(files)
    return paths, labels



def finish(o, name, summary, paper=None, source=None):
    """Copy and check the placed images (Output.publish), then write prepare.json (source, options, counts,
    the paper's counts): the file that marks the folder as made by prepare (only such a folder may be replaced
    by --force). Call it last inside the `with Output(...)` block; the summary gets "paper_counts"."""
    o.publish()
    summary["paper_counts"] = dict(paper or {})
    record = {"dataset": name, "source": str(Path(source or o.src).resolve()), "project_version": VERSION,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seed": o.seed, "copy": bool(o.copy), "max_side": o.max_side,
              "images_checked": len(o.placed) if o.verify else 0, "files": sorted(o.files), **summary}
    o.write_json("prepare.json", record)


def counts_table(summary):
    """Lines of a 'split | class | ours | paper' table."""
    paper = summary.get("paper_counts", {})
    per_class = paper.get("per_class", {})
    lines = [f"{'split':<16} {'class':<48} {'ours':>8} {'paper':>8}"]  # paper: blank = not given
    for split, by_class in summary["counts"].items():
        if not isinstance(by_class, dict) or not any(by_class.values()):
            continue  # e.g. the empty "val" of the train/test-only datasets
        for k, (cls, n) in enumerate(by_class.items()):
            ref = per_class.get(split, [None] * len(by_class))[k] if split in per_class else None
            lines.append(f"{split:<16} {str(cls)[:48]:<48} {n:>8} {'' if ref is None else ref:>8}")
        total = sum(v for v in by_class.values() if isinstance(v, int)) if "volumes" not in by_class else None
        if total is not None and len(by_class) > 1:
            ref = paper.get(split)
            lines.append(f"{split:<16} {'(all)':<48} {total:>8} {'' if ref is None else ref:>8}")
    return lines


