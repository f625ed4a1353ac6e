"""MIMIC-CXR-JPG 2.0.0 + reports: per-study image-report CSVs with lateral and prior views (alta.py,
adaptor.py, cleft.py)."""
import re
from collections import Counter, defaultdict

from common.data import CHEXPERT_FINDINGS, DataError
from common.prepare.util import Output, find_dir, find_file, finish, progress, read_csv

PAPER_COUNTS = {"mimic-cxr": {}}
CLASSNAMES = {}

SECTION_RE = re.compile(r"^\s*([A-Z][A-Z &/,()-]*[A-Z)]):", re.MULTILINE)


def report_sections(text):
    """{"FINDINGS": ..., "IMPRESSION": ...} of a MIMIC-CXR report; each section runs to the next HEADER:."""
    heads = list(SECTION_RE.finditer(text))
    out = {}
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())
        out.setdefault(m.group(1).strip(), body)
    return out


def _mimic_report_root(src):
    """Where the report .txt tree is: MIMIC-CXR's mimic-cxr-reports.zip unpacks to files/pXX/pN/sM.txt."""
    for c in ["", "mimic-cxr-reports", "reports"]:
        p = (src / c if c else src) / "files"
        if p.is_dir() and next(p.glob("p*/p*/s*.txt"), None) is not None:
            return p
    raise DataError(f"mimic-cxr: no report files (files/pXX/pNNNNNNNN/sNNNNNNNN.txt) under {src}, "
                    f"{src / 'mimic-cxr-reports'} or {src / 'reports'}: unzip MIMIC-CXR's mimic-cxr-reports.zip there")


def prepare_mimic_cxr(src, out, **opts):
    """MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports -> per-study image-report CSVs (ALTA's 5 columns) + label CSVs.

    One row per study that has a frontal (PA, else AP) image and a FINDINGS or IMPRESSION section:
    image_path = that frontal image, auxview_image_path = a lateral (LATERAL, else LL) of the same study,
    last_image_path / last_auxview_image_path = the frontal / lateral of the patient's previous study by
    StudyDate + StudyTime (only studies with a frontal count as previous), report = FINDINGS + " " + IMPRESSION.
    "-1" marks a missing view. Studies whose images are not on disk are skipped and counted (subsets are common).
    """
    name = "mimic-cxr"
    need = "mimic-cxr-2.0.0-{metadata,split,chexpert}.csv(.gz) and files/"
    meta_p = find_file(src, ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"], name, need)
    split_p = find_file(src, ["mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"], name, need)
    chex_p = find_file(src, ["mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"], name, need)
    files = find_dir(src, ["files"], name, need)
    reports = _mimic_report_root(src)
    meta = read_csv(meta_p, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"])
    split_of = {r["dicom_id"]: r["split"] for r in read_csv(split_p, ["dicom_id", "split"])}
    chex = {r["study_id"]: r for r in read_csv(chex_p, ["subject_id", "study_id"] +
                                               [f for f in CHEXPERT_FINDINGS])}
    studies = defaultdict(lambda: {"frontal": [], "lateral": []})
    for r in meta:
        view = r["ViewPosition"]
        kind = "frontal" if view in ("PA", "AP") else "lateral" if view in ("LATERAL", "LL") else None
        if kind is None:
            continue
        img = files / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}" / f"s{r['study_id']}" / f"{r['dicom_id']}.jpg"
        s = studies[(r["subject_id"], r["study_id"])]
        s[kind].append((0 if view in ("PA", "LATERAL") else 1, r["dicom_id"], img))
        s["when"] = (r["StudyDate"], r["StudyTime"].zfill(10))
        s["split"] = split_of.get(r["dicom_id"], s.get("split"))  # official split is per patient
    skipped = Counter()

    def pick(views):
        """Preferred view (PA over AP, LATERAL over LL, then dicom_id) that exists on disk, or None."""
        for _, _, img in sorted(views):
            if img.is_file():
                return img
        return None

    by_subject = defaultdict(list)
    for (subj, study), s in studies.items():
        s["frontal_img"], s["lateral_img"] = pick(s["frontal"]), pick(s["lateral"])
        if s["frontal_img"] is None:
            skipped["no frontal image on disk"] += 1
            continue
        if s["split"] not in ("train", "validate", "test"):
            skipped["not in the split file"] += 1
            continue
        by_subject[subj].append((s["when"], study, s))
    rows = defaultdict(list)
    with Output(out, src, **opts) as o:
        for subj, seq in progress(sorted(by_subject.items()), "reading reports, patient"):
            seq.sort()
            prev = None
            for when, study, s in seq:
                path = reports / f"p{subj[:2]}" / f"p{subj}" / f"s{study}.txt"
                sec = report_sections(path.read_text(errors="replace")) if path.is_file() else {}
                text = " ".join(t for t in (sec.get("FINDINGS", ""), sec.get("IMPRESSION", "")) if t)
                if not path.is_file():
                    skipped["no report file"] += 1
                elif not text:
                    skipped["no FINDINGS or IMPRESSION section"] += 1
                else:
                    ref = lambda img: o.place(img) if img is not None else "-1"
                    lab = chex.get(study)
                    rows[s["split"]].append((
                        [ref(s["frontal_img"]), text, ref(s["lateral_img"]),
                         ref(prev["frontal_img"]) if prev else "-1", ref(prev["lateral_img"]) if prev else "-1",
                         sec.get("FINDINGS", ""), sec.get("IMPRESSION", ""), subj, study],
                        [ref(s["frontal_img"])] + [lab[f] if lab else "" for f in CHEXPERT_FINDINGS]))
                prev = s  # the previous study only needs a frontal image, not a usable report
        if not any(rows.values()):
            raise DataError(f"mimic-cxr: no study has both a frontal JPEG under {files} and a report under "
                            f"{reports}")
        header = ["image_path", "report", "auxview_image_path", "last_image_path", "last_auxview_image_path",
                  "findings", "impression", "subject_id", "study_id"]
        counts = {}
        for split in ("train", "validate", "test"):
            o.write_csv(f"reports_{split}.csv", header, [r for r, _ in rows[split]])
            o.write_csv(f"labels_{split}.csv", ["Path"] + CHEXPERT_FINDINGS, [l for _, l in rows[split]])
            rs = rows[split]
            counts[split] = {"studies": len(rs), "with_lateral": sum(r[2] != "-1" for r, _ in rs),
                             "with_previous": sum(r[3] != "-1" for r, _ in rs)}
        summary = {"counts": counts, "skipped": dict(skipped), "notes": [
            "one row per study: frontal PA>AP, lateral LATERAL>LL, previous study by StudyDate+StudyTime; "
            "report = FINDINGS + IMPRESSION; official split (mimic-cxr-2.0.0-split)"]}
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary


