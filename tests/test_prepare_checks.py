"""Tests for what common/prepare/ checks before it publishes (issue 9, point 3, and the --force rule of point 1):
--force replaces only a folder prepare made; every image decodes (truncated / zero-byte files are named); repeated
label rows are dropped and said, contradictory ones refused; a split whose ground truth is missing and a class
with no training image are warned about; long work prints a progress line with an ETA; no hidden .partial
folder survives an exception, a failed symlink or SIGTERM. Each test fails on the code before these checks.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import prepare
from common.data import DataError, read_split
from test_prepare import ISIC_COLS, img, make_isic, write_csv

REPO = Path(__file__).resolve().parent.parent
GT = "ISIC2018_Task3_{0}_GroundTruth/ISIC2018_Task3_{0}_GroundTruth.csv"


def leftovers(parent):
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))


def gt_rows(src, part):
    with open(src / GT.format(part)) as f:
        return [line.rstrip("\n").split(",") for line in f][1:]


# ---------------------------------------------------------------------------------------------------------
# --force replaces only what prepare made


def test_force_never_replaces_a_users_folder_or_file(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="never replaced, even with --force"):
        prepare.run("isic", src, mine, force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    with pytest.raises(DataError, match="is a file"):
        prepare.run("isic", src, note, force=True)
    assert note.read_text() == "keep me"
    (mine / "prepare.json").write_text("{}")  # a prepare.json that is not ours
    with pytest.raises(DataError, match="prepare did not make"):
        prepare.run("isic", src, mine, force=True)
    assert (mine / "thesis.tex").is_file()
    # a folder prepare made for another dataset is not silently replaced either
    prepare.run("isic", src, tmp_path / "isic")
    with pytest.raises(DataError, match="holds the prepared dataset 'isic', not 'kvasir'"):
        prepare.run("kvasir", src, tmp_path / "isic", force=True)
    # the CLI says it without a traceback
    assert prepare.main(["isic", "--src", str(src), "--out", str(mine), "--force"]) == 2
    assert (mine / "thesis.tex").is_file()
    # and a folder prepare made is rebuilt
    img(src / "ISIC2018_Task3_Training_Input" / "ISIC_0000099.jpg")
    write_csv(src / GT.format("Training"), ["image"] + ISIC_COLS,
              gt_rows(src, "Training") + [["ISIC_0000099"] + ["1.0"] + ["0.0"] * 6])
    assert sum(prepare.run("isic", src, tmp_path / "isic", force=True)["counts"]["train"].values()) == 8


# ---------------------------------------------------------------------------------------------------------
# every published image decodes


@pytest.mark.parametrize("copy", [False, True])
def test_truncated_and_empty_images_are_named(tmp_path, capsys, copy):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1), size=(64, 48))
    truncated = src / "ISIC2018_Task3_Training_Input" / "ISIC_0000002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty = src / "ISIC2018_Task3_Test_Input" / "ISIC_0000010.jpg"
    empty.write_bytes(b"")
    out = tmp_path / "data" / "isic"
    with pytest.raises(DataError) as e:
        prepare.run("isic", src, out, copy=copy)
    msg = str(e.value)
    assert "2 of 14 images cannot be read" in msg and "--no-verify" in msg
    assert str(truncated) in msg and str(empty) in msg and "empty file (0 bytes)" in msg
    assert not out.exists() and leftovers(tmp_path / "data") == []
    assert prepare.main(["isic", "--src", str(src), "--out", str(out)] + ["--copy"] * copy) == 2
    assert "Traceback" not in capsys.readouterr().err
    # --no-verify publishes them unchecked (the user's choice)
    assert prepare.main(["isic", "--src", str(src), "--out", str(out), "--no-verify"] + ["--copy"] * copy) == 0
    assert json.loads((out / "prepare.json").read_text())["images_checked"] == 0


def test_progress_line_with_eta(tmp_path, capsys):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    assert prepare.main(["isic", "--src", str(src), "--out", str(tmp_path / "isic")]) == 0
    printed = capsys.readouterr().out
    assert "checking 14 images: 14/14" in printed and "eta" in printed
    assert json.loads((tmp_path / "isic" / "prepare.json").read_text())["images_checked"] == 14


# ---------------------------------------------------------------------------------------------------------
# label files: repeated rows, missing ground truth, absent classes


def test_duplicate_label_rows_are_dropped_and_said(tmp_path, capsys):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    rows = gt_rows(src, "Training")
    write_csv(src / GT.format("Training"), ["image"] + ISIC_COLS, rows + [rows[3], rows[3]])
    summary = prepare.run("isic", src, tmp_path / "isic")
    assert sum(summary["counts"]["train"].values()) == 7  # not 9
    assert len(read_split(tmp_path / "isic" / "split_isic.json")["train"]) == 7
    assert any("2 duplicate row(s) dropped" in w and rows[3][0] in w for w in summary["warnings"])
    assert prepare.main(["isic", "--src", str(src), "--out", str(tmp_path / "isic2")]) == 0
    assert "warning:" in capsys.readouterr().out
    # the same image with another label is a contradiction: refused, naming the image
    other = [rows[3][0]] + ["0.0"] * 6 + ["1.0"]
    write_csv(src / GT.format("Training"), ["image"] + ISIC_COLS, rows + [other])
    with pytest.raises(DataError, match=f"image '{rows[3][0]}' is listed twice with different values"):
        prepare.run("isic", src, tmp_path / "isic3")


def test_duplicate_rows_in_a_seeded_dataset(tmp_path):
    src = tmp_path / "aptos"
    rows = []
    for c in range(5):
        for k in range(4):
            rows.append([f"id{c}{k}", c])
            img(src / "train_images" / f"id{c}{k}.png")
    write_csv(src / "train.csv", ["id_code", "diagnosis"], rows + rows[:3])
    summary = prepare.run("aptos2019", src, tmp_path / "out")
    assert sum(len(v) for v in read_split(tmp_path / "out" / "split_aptos2019.json").values()) == 20
    assert "3 duplicate row(s) dropped" in summary["warnings"][0]


def test_split_whose_ground_truth_is_missing_is_reported(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(1, 1, 1))
    (src / GT.format("Validation")).unlink()  # the validation images are there, their labels are not
    summary = prepare.run("isic", src, tmp_path / "isic")
    assert summary["counts"]["val"] == {c: 0 for c in prepare.CLASSNAMES["isic"]}
    assert any("ISIC2018_Task3_Validation_Input/ is there but ISIC2018_Task3_Validation_GroundTruth.csv is not"
               in w and "validation split is empty" in w for w in summary["warnings"])


def test_class_absent_from_train_is_warned(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    rows = [r for r in gt_rows(src, "Training") if r[7] != "1.0"]  # drop the only VASC training image
    write_csv(src / GT.format("Training"), ["image"] + ISIC_COLS, rows)
    summary = prepare.run("isic", src, tmp_path / "isic")
    assert summary["counts"]["train"]["Vascular lesion"] == 0
    assert any("no training image of class(es) ['Vascular lesion']" in w for w in summary["warnings"])
    full = prepare.run("isic", make_isic(tmp_path / "raw2", per_class=(1, 1, 1)), tmp_path / "isic2")
    assert full["warnings"] == []


# ---------------------------------------------------------------------------------------------------------
# no stale .partial folders


def test_failed_symlink_leaves_no_partial_and_says_copy(tmp_path, monkeypatch):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    (tmp_path / "data").mkdir()

    def no_symlinks(*a, **k):
        raise OSError(1, "Operation not permitted")  # e.g. Windows without developer mode

    monkeypatch.setattr(os, "symlink", no_symlinks)
    with pytest.raises(DataError, match="pass --copy"):
        prepare.run("isic", src, tmp_path / "data" / "isic")
    assert list((tmp_path / "data").iterdir()) == []
    prepare.run("isic", src, tmp_path / "data" / "isic", copy=True)  # what the message says works
    assert (tmp_path / "data" / "isic" / "raw").is_dir()


def test_a_live_runs_partial_folder_is_kept(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(1, 0, 1))
    (tmp_path / "data").mkdir()
    live = tmp_path / "data" / f".isic.partial-{os.getppid()}"  # the process that started pytest: alive
    dead = tmp_path / "data" / ".isic.partial-999999999"        # above any pid_max: no such process
    live.mkdir()
    dead.mkdir()
    prepare.run("isic", src, tmp_path / "data" / "isic")
    assert leftovers(tmp_path / "data") == [live.name]


SLOW_PREPARE = """
import shutil, sys, time
copyfile = shutil.copyfile
shutil.copyfile = lambda a, b: (time.sleep(0.5), copyfile(a, b))[1]  # a slow disk: --copy takes a while
from common.prepare import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_leaves_nothing_behind(tmp_path):
    src = make_isic(tmp_path / "raw", per_class=(2, 0, 2))
    data = tmp_path / "data"
    command = [sys.executable, "-c", SLOW_PREPARE, "isic", "--src", str(src), "--out", str(data / "isic"), "--copy"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 60
    copying = lambda: data.is_dir() and any(p.name.startswith(".isic.partial-") and (p / "raw").is_dir()
                                            for p in data.iterdir())
    while not copying():  # the split files are written, the copies are being made
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "nothing was published" in err and "Traceback" not in err
    assert list(data.iterdir()) == []
