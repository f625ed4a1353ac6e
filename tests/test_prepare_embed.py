"""common/prepare/embed.py on a mock EMBED download: the official caption rule, which images it skips, the
splits, and that cleft.py trains on the result (--data embed)."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import prepare  # noqa: E402
from common.data import DataError  # noqa: E402
from common.prepare import embed  # noqa: E402

META = ["anon_dicom_path", "acc_anon", "empi_anon", "FinalImageType", "ImageLateralityFinal", "ViewPosition"]


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def mock_embed(root, n_patients=12, splits=False):
    """Per patient one study with an L and an R 2-D image and a C-view image (not 2-D); clinical rows for side L
    (and R for even patients) with density / assessment; patient 3 has no assessment (its images are skipped)."""
    meta, clinical = [], []
    letters = "ANBPSMK"
    for p in range(n_patients):
        acc = f"acc{p}"
        for side, view in (("L", "CC"), ("R", "MLO")):
            rel = f"cohort_1/{p}/{acc}/{side}.dcm"
            meta.append([f"/mnt/NAS2/mammo/anon_dicom/{rel}", acc, f"pat{p}", "2D", side, view])
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "images" / rel).write_bytes(b"mock dicom")
        meta.append([f"/mnt/NAS2/mammo/anon_dicom/cohort_1/{p}/{acc}/c.dcm", acc, f"pat{p}", "C-view", "L", "CC"])
        clinical.append([acc, "L", str(float(1 + p % 4)), "" if p == 3 else letters[p % 7]])
        if p % 2 == 0:
            clinical.append([acc, "R", "5" if p == 4 else "2", "N"])
    if splits:
        thirds = {"train": meta[:18], "valid": meta[18:27], "test": meta[27:]}
        for name, rows in thirds.items():
            write_csv(root / "tables" / f"EMBED_OpenData_metadata_reduced_{name}.csv", META, rows)
    else:
        write_csv(root / "tables" / "EMBED_OpenData_metadata_reduced.csv", META, meta)
    write_csv(root / "tables" / "EMBED_OpenData_clinical_reduced.csv", ["acc_anon", "side", "tissueden", "asses"],
              clinical)


@pytest.fixture
def fake_dicom(monkeypatch):
    """pydicom is a prepare-only dependency; the mock's DICOMs decode to a gradient."""
    monkeypatch.setattr(embed, "read_dicom", lambda path: (np.arange(40 * 30).reshape(40, 30) % 997, "MONOCHROME2"))


def test_caption_is_built_and_cleaned_as_the_official_dataset_does():
    row = dict(ImageLateralityFinal="L", ViewPosition="CC")
    clinical = [dict(side="R", tissueden="4", asses="N"), dict(side="L", tissueden="2.0", asses="S")]
    caption, birads, density = embed.build_caption(row, clinical)  # the row of the image's side, not the first
    assert caption == ("this is a breast 2d full field digital mammogram of a patient on side left with view cc "
                       "with breast tissue density 2 scattered fibroglandular densities with birads score 4 "
                       "suspicious abnormality")
    assert (birads, density) == (4, 1)
    # no row of that side: the study's first; side and view are optional, density and BI-RADS are not
    caption, birads, density = embed.build_caption(dict(ImageLateralityFinal="", ViewPosition=""), clinical)
    assert caption.startswith("this is a breast 2d full field digital mammogram of a patient with breast tissue "
                              "density 4 extremely dense with birads score 1 negative") and density == 3
    assert embed.build_caption(row, [dict(side="L", tissueden="", asses="N")]) is None
    assert embed.build_caption(row, [dict(side="L", tissueden="3", asses="X")]) is None
    assert embed.build_caption(row, []) is None
    assert embed.build_caption(row, [dict(side="L", tissueden="5", asses="B")])[2] is None  # male: no density class


def test_prepare_embed_writes_captions_and_splits(tmp_path, fake_dicom):
    src, out = tmp_path / "src", tmp_path / "embed"
    mock_embed(src)
    summary = prepare.run("embed", src, out, seed=0)
    train = list(csv.DictReader(open(out / "captions_train.csv")))
    birads = json.loads((out / "split_embed-birads.json").read_text())
    density = json.loads((out / "split_embed-density.json").read_text())
    n = sum(len(birads[s]) for s in ("train", "val", "test"))
    assert n == 22  # 12 patients x 2 two-D images, minus patient 3's two (no assessment); C-view never
    assert sum(len(density[s]) for s in ("train", "val", "test")) == 21  # patient 4's R image is male density 5
    assert all((out / r[0]).is_file() and r[0].endswith(".png") for s in birads.values() for r in s)
    assert train and all(r["report"].startswith("this is a breast 2d full field digital mammogram") for r in train)
    assert {r[2] for s in birads.values() for r in s} <= set(embed.CLASSNAMES["embed-birads"])
    patients = {s: {r[0].split("/")[2] for r in birads[s]} for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])  # by patient
    assert "skipped" in " ".join(summary["notes"]) and (out / "prepare.json").is_file()


def test_prepare_embed_uses_the_authors_split_files_when_present(tmp_path, fake_dicom):
    src, out = tmp_path / "src", tmp_path / "embed"
    mock_embed(src, splits=True)
    prepare.run("embed", src, out)
    birads = json.loads((out / "split_embed-birads.json").read_text())
    assert len(birads["train"]) == 12 - 2 and len(birads["val"]) == 6 and len(birads["test"]) == 6


def test_prepare_embed_names_what_is_missing(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="EMBED_OpenData_clinical_reduced.csv"):
        prepare.run("embed", tmp_path / "src", tmp_path / "out")


def test_cleft_pretrains_on_prepared_embed(tmp_path, fake_dicom):
    import cleft
    src, out = tmp_path / "src", tmp_path / "embed"
    mock_embed(src, n_patients=24)
    prepare.run("embed", src, out)
    run = tmp_path / "run"
    assert cleft.main(["--data", "embed", "--data-dir", str(out), "--vit", "tiny", "--llm", "tiny", "--steps", "2",
                       "--batch-size", "4", "--eval-batch-size", "8", "--out", str(run), "--print-every", "100"]) == 0
    rep = json.loads((run / "metrics_zero-shot_after_contrastive.json").read_text())
    assert len(rep["per_class"]) == 7
