"""Tests for common/ct.py: the NIfTI-1 reader/writer, each CT-CLIP preprocessing step, and CTVolumeDataset."""

import gzip
import struct

import numpy as np
import pytest
import torch

from common.ct import (CTVolumeDataset, clip_hu, crop_or_pad, header_rescale, normalize, parse_xy_spacing,
                       preprocess_ct, read_nifti, resample, to_hu, write_nifti)
from common.data import DataError

# -----------------------------------------------------------------------------
# NIfTI round trips


@pytest.mark.parametrize("name,dtype", [("v.nii.gz", np.int16), ("v.nii", np.int16),
                                        ("v.nii.gz", np.float32), ("v.nii", np.float32)])
def test_roundtrip_int16_float32(tmp_path, name, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 500, (7, 5, 3))).astype(dtype)
    write_nifti(tmp_path / name, arr, spacing=(0.7, 0.8, 1.25), slope=0.5, inter=-1000)
    back, hdr = read_nifti(tmp_path / name)
    assert back.dtype == dtype and back.shape == (7, 5, 3)
    np.testing.assert_array_equal(back, arr)  # stored values, no scaling applied
    np.testing.assert_allclose(hdr["spacing"], (0.7, 0.8, 1.25), rtol=1e-6)
    assert (hdr["scl_slope"], hdr["scl_inter"]) == (0.5, -1000.0)
    assert header_rescale(hdr) == (0.5, -1000.0)
    assert hdr["dim"][:4] == (3, 7, 5, 3) and hdr["magic"] == "n+1" and hdr["vox_offset"] == 352.0


@pytest.mark.parametrize("dtype,code", [(np.uint8, 2), (np.int32, 8), (np.float64, 64), (np.int8, 256),
                                        (np.uint16, 512), (np.uint32, 768)])
def test_roundtrip_other_dtypes(tmp_path, dtype, code):
    arr = (np.arange(24).reshape(2, 3, 4) % 100).astype(dtype)
    write_nifti(tmp_path / "v.nii", arr)
    back, hdr = read_nifti(tmp_path / "v.nii")
    assert hdr["datatype"] == code and hdr["bitpix"] == 8 * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(back, arr)


def test_written_header_bytes(tmp_path):
    write_nifti(tmp_path / "v.nii", np.zeros((2, 3, 4), np.int16), spacing=(0.5, 0.5, 2.0), slope=2.0, inter=-3.0)
    b = (tmp_path / "v.nii").read_bytes()
    assert len(b) == 352 + 2 * 3 * 4 * 2
    assert b[0:4] == b"\x5c\x01\x00\x00"                        # sizeof_hdr = 348 = 0x015c, little endian
    assert b[40:48] == bytes([3, 0, 2, 0, 3, 0, 4, 0])          # dim[0..3] = 3, 2, 3, 4
    assert b[70:74] == bytes([4, 0, 16, 0])                     # datatype 4 (int16), bitpix 16
    assert b[108:112] == bytes.fromhex("0000b043")              # vox_offset 352.0 as a float32
    assert b[112:116] == bytes.fromhex("00000040")              # scl_slope 2.0
    assert b[344:348] == b"n+1\x00"


def test_gzip_output_is_deterministic_and_detected_by_magic(tmp_path):
    arr = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    write_nifti(tmp_path / "a.nii.gz", arr)
    write_nifti(tmp_path / "b.nii.gz", arr)
    a, b = (tmp_path / "a.nii.gz").read_bytes(), (tmp_path / "b.nii.gz").read_bytes()
    assert a == b
    assert a[:2] == b"\x1f\x8b" and a[3] == 0 and a[4:8] == b"\x00\x00\x00\x00"  # no FNAME flag, mtime 0
    # a gzipped file without the .gz suffix, and a plain file with it, are still read correctly
    (tmp_path / "gz_named.nii").write_bytes(a)
    (tmp_path / "plain_named.nii.gz").write_bytes(gzip.decompress(a))
    for name in ("gz_named.nii", "plain_named.nii.gz"):
        np.testing.assert_array_equal(read_nifti(tmp_path / name)[0], arr)


def _hand_header(endian, datatype=4, bitpix=16, dim=(3, 2, 3, 4, 1, 1, 1, 1), magic=b"n+1\x00"):
    """A NIfTI-1 header built field by field from the standard's offsets, independent of write_nifti."""
    h = bytearray(348)
    struct.pack_into(endian + "i", h, 0, 348)
    struct.pack_into(endian + "8h", h, 40, *dim)
    struct.pack_into(endian + "2h", h, 70, datatype, bitpix)
    struct.pack_into(endian + "8f", h, 76, 1, 0.6, 0.7, 2.5, 1, 1, 1, 1)
    struct.pack_into(endian + "3f", h, 108, 352, 0.0, 0.0)  # scl_slope 0 = "no scaling" per the standard
    h[344:348] = magic
    return bytes(h) + b"\x00" * 4


@pytest.mark.parametrize("endian", ["<", ">"])
def test_hand_built_file_both_byte_orders_fortran_order(tmp_path, endian):
    data = struct.pack(endian + "24h", *range(24))  # on disk x runs fastest, then y, then z
    (tmp_path / "h.nii").write_bytes(_hand_header(endian) + data)
    arr, hdr = read_nifti(tmp_path / "h.nii")
    assert arr.shape == (2, 3, 4) and hdr["endian"] == endian
    assert arr[1, 0, 0] == 1 and arr[0, 1, 0] == 2 and arr[0, 0, 1] == 6 and arr[1, 2, 3] == 23
    assert arr.dtype == np.int16 and arr.dtype.byteorder in "=|"
    np.testing.assert_allclose(hdr["spacing"], (0.6, 0.7, 2.5), rtol=1e-6)
    assert header_rescale(hdr) == (1.0, 0.0)


def test_4d_with_one_timepoint_is_3d(tmp_path):
    (tmp_path / "h.nii").write_bytes(_hand_header("<", dim=(4, 2, 3, 4, 1, 1, 1, 1)) + bytes(48))
    assert read_nifti(tmp_path / "h.nii")[0].shape == (2, 3, 4)


@pytest.mark.parametrize("kwargs,data_len,message", [
    (dict(datatype=1024, bitpix=64), 192, "unsupported NIfTI datatype code 1024"),   # int64
    (dict(dim=(4, 2, 3, 4, 2, 1, 1, 1)), 96, "expected a 3-D volume"),
    (dict(dim=(2, 2, 3, 1, 1, 1, 1, 1)), 12, "expected a 3-D volume"),
    (dict(magic=b"ni1\x00"), 48, ".hdr/.img"),
    (dict(magic=b"\x00\x00\x00\x00"), 48, "bad NIfTI-1 magic"),
    (dict(), 47, "truncated"),
])
def test_bad_files_raise_dataerror_naming_the_file(tmp_path, kwargs, data_len, message):
    path = tmp_path / "bad.nii"
    path.write_bytes(_hand_header("<", **kwargs) + bytes(data_len))
    with pytest.raises(DataError, match=message) as e:
        read_nifti(path)
    assert str(path) in str(e.value)


def test_missing_truncated_gzip_and_wrong_sizeof_hdr(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_nifti(tmp_path / "nope.nii.gz")
    write_nifti(tmp_path / "v.nii.gz", np.ones((8, 8, 8), np.int16))
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "v.nii.gz").read_bytes()[:-12])
    with pytest.raises(DataError, match="cut.nii.gz.*gzip"):
        read_nifti(tmp_path / "cut.nii.gz")
    (tmp_path / "short.nii").write_bytes(b"\x5c\x01\x00\x00" + bytes(100))
    with pytest.raises(DataError, match="short.nii.*truncated"):
        read_nifti(tmp_path / "short.nii")
    (tmp_path / "n2.nii").write_bytes(struct.pack("<i", 540) + bytes(600))
    with pytest.raises(DataError, match="NIfTI-2"):
        read_nifti(tmp_path / "n2.nii")


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match="int64"):
        write_nifti(tmp_path / "x.nii", np.zeros((2, 2, 2), np.int64))
    with pytest.raises(DataError, match="3-D"):
        write_nifti(tmp_path / "x.nii", np.zeros((2, 2), np.int16))

# -----------------------------------------------------------------------------
# preprocessing steps, hand-computed expectations


def test_to_hu_clip_normalize():
    raw = np.array([0, 1024, 2048, 3500], np.int16)
    np.testing.assert_array_equal(to_hu(raw, 1.0, -1024.0), [-1024, 0, 1024, 2476])
    np.testing.assert_array_equal(to_hu(raw, 0.5, -1000.0), [-1000, -488, 24, 750])
    np.testing.assert_array_equal(clip_hu(to_hu(raw, 1.0, -1024.0)), [-1000, 0, 1000, 1000])
    out = normalize(np.array([-1000.0, 0.0, 500.0, 1000.0]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-1.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(clip_hu(torch.tensor([-2000.0, 3.0, 2000.0])), [-1000.0, 3.0, 1000.0])


def test_crop_or_pad_centre_and_fill():
    vol = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    out = crop_or_pad(vol, (5, 3, 4), fill=-1)
    assert out.shape == (5, 3, 4)
    # axis 0: 2 -> 5 pads (5 - 2) // 2 = 1 before and 2 after; axis 1: 6 -> 3 crops from (6 - 3) // 2 = 1
    assert (out[0] == -1).all() and (out[3:] == -1).all()
    assert torch.equal(out[1:3], vol[:, 1:4, :])
    # a single voxel padded to 3x3x3 lands in the middle
    one = crop_or_pad(torch.full((1, 1, 1), 5.0), (3, 3, 3))
    assert one[1, 1, 1] == 5 and one.sum() == 5 - 26


def test_resample_constant_and_linear():
    const = resample(np.full((4, 4, 4), 7.0), (1.5, 1.5, 3.0), (0.75, 0.75, 1.5))
    assert const.shape == (8, 8, 8) and torch.allclose(const, torch.tensor(7.0))
    # x-ramp 0..3 upsampled 2x with align_corners=False: source x = (i + 0.5) / 2 - 0.5, clamped at the edges
    ramp = np.broadcast_to(np.arange(4.0)[:, None, None], (4, 2, 2))
    up = resample(ramp, (1.5, 0.75, 1.5), (0.75, 0.75, 1.5))
    assert up.shape == (8, 2, 2)
    torch.testing.assert_close(up[:, 0, 0], torch.tensor([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]))
    # 2x downsampling: source x = 2 i + 0.5
    down = resample(np.arange(8.0).reshape(8, 1, 1), (0.375, 0.75, 1.5), (0.75, 0.75, 1.5))
    torch.testing.assert_close(down[:, 0, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    # CT-CLIP truncates the new size with int(): 64 * 0.7 / 0.75 = 59.73 -> 59 (round() would give 60)
    assert resample(np.zeros((64, 2, 2)), (0.7, 0.75, 1.5), (0.75, 0.75, 1.5)).shape == (59, 2, 2)


def test_preprocess_ct_layout_values_and_padding():
    x, y, z = np.meshgrid(np.arange(6), np.arange(4), np.arange(2), indexing="ij")
    raw = (1024 + 100 * x + 10 * y + z).astype(np.int16)
    raw[5] = 1024 + 3000                                     # above the clip
    out = preprocess_ct(raw, (0.75, 0.75, 1.5), 1.0, -1024.0, target_shape=(6, 4, 4))
    assert out.shape == (1, 4, 6, 4) and out.dtype == torch.float32   # (1, Z, X, Y)
    assert (out[0, 0] == -1).all() and (out[0, 3] == -1).all()     # z padded 1 before, 1 after with -1
    for xi, yi, zi in [(0, 0, 0), (2, 3, 1), (4, 1, 0)]:
        assert out[0, zi + 1, xi, yi].item() == pytest.approx((100 * xi + 10 * yi + zi) / 1000)
    assert (out[0, 1:3, 5] == 1.0).all()                     # 3000 HU clipped to 1000 -> 1.0


def test_clip_before_or_after_resampling():
    raw = np.array([-3000.0, 0.0]).reshape(2, 1, 1)
    kw = dict(spacing=(1.5, 0.75, 1.5), target_shape=(4, 1, 1))
    before = preprocess_ct(raw, **kw)[0, 0, :, 0]           # clip, then upsample [-1000, 0] -> x 2
    after = preprocess_ct(raw, clip_before_resample=False, **kw)[0, 0, :, 0]
    torch.testing.assert_close(before, torch.tensor([-1.0, -0.75, -0.25, 0.0]))
    torch.testing.assert_close(after, torch.tensor([-1.0, -1.0, -0.75, 0.0]))


def test_default_shape_is_ct_clip_input():
    out = preprocess_ct(np.zeros((10, 12, 5), np.int16), (0.75, 0.75, 1.5))
    assert out.shape == (1, 240, 480, 480)
    assert out[0, 120, 240, 240] == 0 and out[0, 0, 0, 0] == -1

# -----------------------------------------------------------------------------
# CTVolumeDataset on a hand-made CT-RATE-style folder


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def ct_folder(tmp_path):
    hu = np.full((4, 4, 2), -500, np.int16)
    hu[0, 0, 0] = 400
    # volume a: stored as raw = HU + 1024 (slope 1, intercept -1024) in CT-RATE's nested layout
    write_nifti(tmp_path / "train_1" / "train_1_a" / "train_1_a_1.nii.gz", hu + 1024, (0.75, 0.75, 1.5), 1.0, -1024.0)
    # volume b: already HU, identity scaling, flat in the root; 1.5 mm in xy, so resampling doubles x and y
    write_nifti(tmp_path / "train_2_a_1.nii.gz", hu, (1.5, 1.5, 1.5))
    labels = _write(tmp_path / "labels.csv", "VolumeName,Emphysema,Lung nodule\n"
                    "train_1_a_1.nii.gz,1,0\ntrain_2_a_1.nii.gz,0,1\n")
    reports = _write(tmp_path / "reports.csv", 'VolumeName,Findings_EN,Impressions_EN\n'
                     'train_1_a_1.nii.gz,"A nodule (5 mm) is ""seen"".",Nodule.\n'
                     'train_2_a_1.nii.gz,Not given.,Normal.\n')
    meta = _write(tmp_path / "metadata.csv", "VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\n"
                  'train_1_a_1.nii.gz,1,-1024,"[0.75, 0.75]",1.5\n'
                  'train_2_a_1.nii.gz,1,-1024,"[1.5, 1.5]",1.5\n')   # the v2 trap: b is already HU
    return tmp_path, labels, reports, meta


def test_dataset_items_and_rescale_paths(ct_folder):
    root, labels, reports, meta = ct_folder
    ds = CTVolumeDataset(root, labels, reports, target_shape=(4, 4, 2))   # header scaling
    assert len(ds) == 2 and ds.findings == ["Emphysema", "Lung nodule"]
    a, b = ds[0], ds[1]
    assert a["name"] == "train_1_a_1.nii.gz" and a["volume"].shape == (1, 2, 4, 4)
    torch.testing.assert_close(a["labels"], torch.tensor([1.0, 0.0]))
    assert a["report"] == "A nodule 5 mm is seen." and b["report"] == ""          # CT-CLIP's text cleanup
    assert a["volume"][0, 0, 0, 0].item() == pytest.approx(0.4) and a["volume"][0, 1, 0, 0].item() == -0.5
    # b: 4 voxels at 1.5 mm -> 8 at 0.75 mm, centre-cropped back to 4
    assert b["volume"].shape == (1, 2, 4, 4) and (b["volume"] != -1).all()
    # with the metadata CSV: a gives the same HU; b gets the CT-RATE v2 double rescale (-500 - 1024 -> clipped)
    dm = CTVolumeDataset(root, labels, reports, target_shape=(4, 4, 2), metadata_csv=meta)
    assert torch.equal(dm[0]["volume"], a["volume"])
    assert (dm[1]["volume"][0, :, 1:3, 1:3] == -1).all()
    dh = CTVolumeDataset(root, labels, reports, target_shape=(4, 4, 2), metadata_csv=meta, rescale="header")
    assert torch.equal(dh[1]["volume"], b["volume"])
    both = CTVolumeDataset(root, labels, reports, target_shape=(4, 4, 2), report_fields=("Findings_EN", "Impressions_EN"))
    assert both[0]["report"] == "A nodule 5 mm is seen. Nodule."


def test_dataset_errors(ct_folder):
    root, labels, reports, meta = ct_folder
    bad = _write(root / "bad_labels.csv", "VolumeName,Emphysema\ntrain_1_a_1.nii.gz,2\n")
    with pytest.raises(DataError, match="bad_labels.csv line 2"):
        CTVolumeDataset(root, bad)
    missing = _write(root / "missing.csv", "VolumeName,Emphysema\ntrain_9_a_1.nii.gz,1\n")
    with pytest.raises(DataError, match="train_9_a_1.nii.gz"):
        CTVolumeDataset(root, missing)
    nocol = _write(root / "nocol.csv", "Name,Emphysema\nx,1\n")
    with pytest.raises(DataError, match="nocol.csv: missing column"):
        CTVolumeDataset(root, nocol)
    with pytest.raises(DataError, match="nope.csv"):
        CTVolumeDataset(root, labels, root / "nope.csv")
    assert parse_xy_spacing("[0.75, 0.75]") == 0.75 and parse_xy_spacing("0.8") == 0.8
    with pytest.raises(DataError, match="XYSpacing"):
        parse_xy_spacing("[a, b]", "meta.csv line 3")
