"""CT-RATE: chest CT volumes + reports + 18 abnormality labels (medct_lora.py)."""
import os
import shutil
from collections import Counter
from pathlib import Path

from common.data import DataError
from common.prepare.util import Output, find_dir, finish, read_csv

PAPER_COUNTS = {"ct-rate": {"train": None, "valid": None}}
CLASSNAMES = {}

CT_RATE_FINDINGS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
]


def prepare_ct_rate(src, out, **opts):
    """CT-RATE: volumes + reports, 18-label and metadata CSVs -> the CSVs common.ct.CTVolumeDataset reads.

    The v2 pitfall (CT-CLIP issue #50): v2 volumes (dataset/train_fixed, valid_fixed) are already in HU, but
    the metadata CSV still lists the DICOM RescaleSlope/RescaleIntercept; CT-CLIP's loader applies them again.
    We pick v2 when its folders exist (else v1 train/, valid/) and, for v2, write RescaleSlope 1 and
    RescaleIntercept 0 into metadata.csv (keeping the DICOM values as DicomRescaleSlope/-Intercept), so the
    default CTVolumeDataset(..., metadata_csv=...) rescale is right for either version.
    """
    name = "ct-rate"
    root = find_dir(src, ["dataset", ""], name, "dataset/{train_fixed or train}/, radiology_text_reports/, "
                    "multi_abnormality_labels/ and metadata/", marker="metadata")
    v2 = (root / "train_fixed").is_dir() or (root / "valid_fixed").is_dir()
    files = {
        "train": ("train_fixed" if v2 else "train", "radiology_text_reports/train_reports.csv",
                  "multi_abnormality_labels/train_predicted_labels.csv", "metadata/train_metadata.csv"),
        "valid": ("valid_fixed" if v2 else "valid", "radiology_text_reports/validation_reports.csv",
                  "multi_abnormality_labels/valid_predicted_labels.csv", "metadata/validation_metadata.csv"),
    }
    for split, (vol, *csvs) in files.items():
        for c in csvs:
            if not (root / c).is_file():
                raise DataError(f"ct-rate: expected {c} under {root} (the CT-RATE CSVs); it is missing")
        if not (root / vol).is_dir():
            raise DataError(f"ct-rate: expected the volume folder {root / vol}/ (v2: train_fixed, valid_fixed; "
                            f"v1: train, valid)")
    summary = {"counts": {}, "skipped": {}, "ct_rate_version": 2 if v2 else 1, "notes": []}
    with Output(out, root, link_raw=False, **opts) as o:  # volumes are referenced per split folder, see below
        meta_rows = []
        for split, (vol, rep_csv, lab_csv, meta_csv) in files.items():
            on_disk = {}
            for dirpath, _, fnames in os.walk(root / vol):
                for fn in fnames:
                    if fn.endswith(".nii.gz"):
                        on_disk[fn] = Path(dirpath) / fn
            labels = read_csv(root / lab_csv, ["VolumeName"] + CT_RATE_FINDINGS)
            meta = {r["VolumeName"]: r for r in read_csv(root / meta_csv, ["VolumeName", "RescaleSlope",
                                                                             "RescaleIntercept", "XYSpacing",
                                                                             "ZSpacing"])}
            keep, skipped = [], Counter()
            for r in labels:
                vals = [r[f] for f in CT_RATE_FINDINGS]
                if r["VolumeName"] not in on_disk:
                    skipped["volume not on disk"] += 1
                elif r["VolumeName"] not in meta:
                    skipped["no metadata row"] += 1
                elif any(v not in ("0", "1", "0.0", "1.0") for v in vals):
                    skipped["label not 0/1"] += 1
                else:
                    keep.append([r["VolumeName"]] + [str(int(float(v))) for v in vals])
            if not keep:
                raise DataError(f"ct-rate: none of the {len(labels)} volumes in {lab_csv} is under {root / vol}")
            names = {k[0] for k in keep}
            # the CT volumes: a symlink per split (CTVolumeDataset's root), or copies of the kept ones with --copy
            vdir = o.tmp / f"volumes_{split}"
            if opts.get("copy"):
                for n in sorted(names):
                    dst = vdir / on_disk[n].relative_to(root / vol)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(on_disk[n], dst)
            else:
                os.symlink((root / vol).resolve(), vdir, target_is_directory=True)
            o.write_csv(f"labels_{split}.csv", ["VolumeName"] + CT_RATE_FINDINGS, keep)
            rep_cols = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
            reps = read_csv(root / rep_csv, ["VolumeName", "Findings_EN", "Impressions_EN"])
            o.write_csv(f"reports_{split}.csv", rep_cols,
                        [[r.get(c, "") for c in rep_cols] for r in reps if r["VolumeName"] in names])
            for n in [k[0] for k in keep]:
                r = meta[n]
                slope, inter = ("1", "0") if v2 else (r["RescaleSlope"], r["RescaleIntercept"])
                meta_rows.append([n, slope, inter, r["XYSpacing"], r["ZSpacing"], r["RescaleSlope"],
                                  r["RescaleIntercept"]])
            summary["counts"][split] = {"volumes": len(keep),
                                        **{f: sum(k[1 + i] == "1" for k in keep) for i, f in
                                           enumerate(CT_RATE_FINDINGS)}}
            summary["skipped"][split] = dict(skipped)
        o.write_csv("metadata.csv", ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing",
                                     "DicomRescaleSlope", "DicomRescaleIntercept"], meta_rows)
        summary["notes"].append(
            f"CT-RATE v{2 if v2 else 1} ({files['train'][0]}/, {files['valid'][0]}/); "
            + ("v2 volumes are already HU: metadata.csv has RescaleSlope 1 / RescaleIntercept 0 (DICOM values kept "
               "in DicomRescale*), avoiding CT-CLIP issue #50's double rescale" if v2 else
               "v1 volumes store raw values: metadata.csv keeps the DICOM RescaleSlope/RescaleIntercept"))
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary


