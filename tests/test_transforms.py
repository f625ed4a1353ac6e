"""
Tests for common/transforms.py: exact pixels against PIL operations computed here, normalisation numbers done by
hand, and torchvision's numbers pasted as goldens.

The torchvision goldens were produced with torchvision 0.29 (PIL path) by this script, in /work/venv-gold:

    import numpy as np, torch, torchvision.transforms as T
    from PIL import Image
    # pattern() as defined below
    for (w, h, seed) in [(40, 30, 0), (40, 30, 1), (30, 40, 2), (224, 224, 3), (7, 5, 4), (200, 10, 0), (10, 200, 0),
                         (200, 11, 0), (11, 200, 0)]:
        torch.manual_seed(seed)
        print((w, h, seed), T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), (0.08, 1.0), (3 / 4, 4 / 3)))
    img, B = pattern(40, 30), T.InterpolationMode.BICUBIC
    ev = T.Compose([T.Resize(8, interpolation=B), T.CenterCrop(8), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    tr = T.Compose([T.RandomResizedCrop(8, scale=(0.08, 1), interpolation=B), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    x = ev(img)                        # then torch.manual_seed(0); x = tr(img)
    print(x.sum(), x[0, 0, 0], x[1, 3, 5], x[2, 7, 7])
"""

import numpy as np
import pytest
import torch
from PIL import Image

from common.transforms import (CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, CenterCrop,
                               Compose, Normalize, PadCrop, RandomHorizontalFlip, RandomResizedCrop, Resize, ToRGB,
                               ToTensor, eval_transform, train_transform)


def pattern(w, h):
    """A deterministic RGB test image of width w and height h with distinct values in every channel."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 37 + y * 11) % 256, (x * 5 + y * 53) % 256, (x * y * 7) % 256], -1).astype(np.uint8)
    return Image.fromarray(a)


def arr(img):
    return np.asarray(img).astype(np.int64)


# -----------------------------------------------------------------------------
# constants, ToTensor, Normalize


def test_statistics_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert HALF_MEAN == (0.5, 0.5, 0.5) and HALF_STD == (0.5, 0.5, 0.5)


def test_to_tensor_layout_and_scale():
    a = np.zeros((2, 3, 3), dtype=np.uint8)  # (H, W, C)
    a[1, 2] = (10, 20, 255)
    x = ToTensor()(Image.fromarray(a))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[:, 1, 2].tolist() == pytest.approx([10 / 255, 20 / 255, 1.0])
    assert x.sum().item() == pytest.approx((10 + 20 + 255) / 255)
    g = ToTensor()(Image.fromarray(np.full((4, 5), 51, dtype=np.uint8)))  # grayscale "L"
    assert g.shape == (1, 4, 5) and torch.allclose(g, torch.full((1, 4, 5), 0.2))


def test_normalize_numbers_by_hand():
    x = torch.zeros(3, 2, 2)
    x[:, 0, 0] = 1.0
    x[:, 1, 1] = 0.5
    y = Normalize(CLIP_MEAN, CLIP_STD)(x)
    # (1 - 0.48145466) / 0.26862954 = 0.51854534 / 0.26862954 = 1.930336...
    assert y[0, 0, 0].item() == pytest.approx(1.930336, abs=1e-5)
    # (1 - 0.4578275) / 0.26130258 = 0.5421725 / 0.26130258 = 2.074884...
    assert y[1, 0, 0].item() == pytest.approx(2.074884, abs=1e-5)
    # (0 - 0.40821073) / 0.27577711 = -1.480218...
    assert y[2, 0, 1].item() == pytest.approx(-1.480218, abs=1e-5)
    z = Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    assert z[0, 0, 1].item() == pytest.approx(-2.117904, abs=1e-5)  # -0.485 / 0.229
    assert z[2, 1, 1].item() == pytest.approx(0.417778, abs=1e-5)  # (0.5 - 0.406) / 0.225 = 0.094 / 0.225
    h = Normalize(HALF_MEAN, HALF_STD)(x)
    assert h[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and h[:, 0, 1].tolist() == [-1.0, -1.0, -1.0]
    assert h[:, 1, 1].tolist() == [0.0, 0.0, 0.0]
    # a batch (B, C, H, W) is normalised per channel too
    assert torch.equal(Normalize(HALF_MEAN, HALF_STD)(x[None])[0], h)


def test_normalize_rejects_bad_input():
    with pytest.raises(TypeError):
        Normalize(CLIP_MEAN, CLIP_STD)(torch.zeros(3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="ToRGB"):
        Normalize(CLIP_MEAN, CLIP_STD)(torch.zeros(1, 2, 2))


# -----------------------------------------------------------------------------
# Resize, CenterCrop


def test_resize_shorter_side_matches_pil_bicubic():
    img = pattern(40, 30)  # landscape: height is the shorter side
    out = Resize(16)(img)
    assert out.size == (21, 16)  # 16 * 40 / 30 = 21.33 -> 21
    assert np.array_equal(arr(out), arr(img.resize((21, 16), Image.BICUBIC)))
    img = pattern(30, 41)  # portrait: 16 * 41 / 30 = 21.87 -> 21, truncated like torchvision, not rounded to 22
    out = Resize(16)(img)
    assert out.size == (16, 21)
    assert np.array_equal(arr(out), arr(img.resize((16, 21), Image.BICUBIC)))
    img = pattern(16, 20)  # already the right size: returned untouched
    assert Resize(16)(img) is img
    assert Resize((5, 7))(pattern(40, 30)).size == (7, 5)  # (h, w) tuple -> exactly that


def test_center_crop_exact_pixels():
    img = pattern(7, 6)
    a = arr(img)
    # top = round((6 - 4) / 2) = 1, left = round((7 - 4) / 2) = round(1.5) = 2
    assert np.array_equal(arr(CenterCrop(4)(img)), a[1:5, 2:6])
    img = pattern(5, 5)
    # round((5 - 2) / 2) = round(1.5) = 2 on both axes
    assert np.array_equal(arr(CenterCrop(2)(img)), arr(img)[2:4, 2:4])
    img = pattern(8, 7)
    # (h, w) = (3, 5): top = round(4 / 2) = 2, left = round(3 / 2) = 2
    assert np.array_equal(arr(CenterCrop((3, 5))(img)), arr(img)[2:5, 2:7])


def test_center_crop_pads_small_images_like_torchvision():
    img = pattern(3, 2)
    out = arr(CenterCrop(4)(img))
    assert out.shape == (4, 4, 3)
    # padding left = (4 - 3) // 2 = 0, top = (4 - 2) // 2 = 1; the rest is zero
    assert np.array_equal(out[1:3, 0:3], arr(img))
    assert out[0].sum() == 0 and out[3].sum() == 0 and out[:, 3].sum() == 0


def test_geometric_transforms_reject_tensors():
    for t in (Resize(4), CenterCrop(4), RandomResizedCrop(4), ToTensor()):
        with pytest.raises(TypeError, match="PIL"):
            t(torch.zeros(3, 8, 8))


# -----------------------------------------------------------------------------
# RandomResizedCrop


@pytest.mark.parametrize("w,h,seed,expected", [
    (40, 30, 0, (5, 2, 23, 27)), (40, 30, 1, (7, 9, 22, 25)), (30, 40, 2, (5, 0, 29, 27)),
    (224, 224, 3, (73, 128, 73, 58)), (7, 5, 4, (1, 2, 4, 5)),
    (200, 10, 0, (0, 93, 10, 13)),  # no attempt fits -> central crop, ratio clamped to 4/3: w = round(10 * 4/3)
    (10, 200, 0, (93, 0, 13, 10)),  # and the transposed case: h = round(10 / (3/4))
    (200, 11, 0, (0, 92, 11, 15)),  # round(11 * 4/3) = round(14.67) = 15, not 14
    (11, 200, 0, (92, 0, 15, 11)),
])
def test_random_resized_crop_params_match_torchvision(w, h, seed, expected):
    torch.manual_seed(seed)
    assert RandomResizedCrop.get_params(w, h, (0.08, 1.0), (3 / 4, 4 / 3)) == expected


def test_random_resized_crop_reproducible_and_within_bounds():
    img = pattern(40, 30)
    t = RandomResizedCrop(8)
    torch.manual_seed(123)
    a = arr(t(img))
    torch.manual_seed(123)
    top, left, h, w = RandomResizedCrop.get_params(40, 30, (0.08, 1.0), (3 / 4, 4 / 3))
    # the output is exactly PIL crop of that box + bicubic resize
    assert np.array_equal(a, arr(img.crop((left, top, left + w, top + h)).resize((8, 8), Image.BICUBIC)))
    torch.manual_seed(123)
    assert np.array_equal(a, arr(t(img)))  # same seed, same pixels
    boxes = set()
    for seed in range(200):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(40, 30, (0.25, 0.5), (3 / 4, 4 / 3))
        boxes.add((top, left, h, w))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40
        # area fraction in [0.25, 0.5] up to rounding w and h to integers (at most half a pixel each)
        assert (w - 0.5) * (h - 0.5) <= 0.5 * 1200 + 1e-9 and (w + 0.5) * (h + 0.5) >= 0.25 * 1200
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    assert len(boxes) > 50  # it is actually random


# -----------------------------------------------------------------------------
# flip, ToRGB


def test_horizontal_flip():
    img = pattern(5, 3)
    assert np.array_equal(arr(RandomHorizontalFlip(p=1.0)(img)), arr(img)[:, ::-1])
    assert RandomHorizontalFlip(p=0.0)(img) is img
    x = torch.arange(6.0).view(1, 2, 3)
    assert RandomHorizontalFlip(p=1.0)(x).tolist() == [[[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]]
    torch.manual_seed(0)
    flips = sum(RandomHorizontalFlip(0.5)(x)[0, 0, 0].item() == 2.0 for _ in range(400))
    assert 150 < flips < 250  # about half; the bound is > 4 sigma from 200


def test_to_rgb():
    g = Image.fromarray(np.array([[0, 128], [255, 7]], dtype=np.uint8))
    rgb = ToRGB()(g)
    assert rgb.mode == "RGB" and np.array_equal(arr(rgb), np.repeat(arr(g)[:, :, None], 3, axis=2))
    assert ToRGB()(torch.ones(1, 2, 2)).shape == (3, 2, 2)
    x = torch.zeros(3, 2, 2)
    assert ToRGB()(x) is x


# -----------------------------------------------------------------------------
# the recipes


def test_eval_transform_equals_pil_steps_and_torchvision():
    img = pattern(40, 30)
    x = eval_transform(8, CLIP_MEAN, CLIP_STD)(img)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    # by hand: shorter side 30 -> 8, long side int(8 * 40 / 30) = 10; centre crop left = round(2 / 2) = 1
    ref = np.asarray(img.resize((10, 8), Image.BICUBIC))[:, 1:9].astype(np.float32) / 255.0
    ref = (ref - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    assert torch.allclose(x, torch.from_numpy(ref.transpose(2, 0, 1)), atol=1e-6)
    # torchvision golden (module docstring)
    assert x.sum().item() == pytest.approx(35.9339, abs=1e-3)
    assert [x[0, 0, 0].item(), x[1, 3, 5].item(), x[2, 7, 7].item()] == pytest.approx([0.3975, 0.28896, 0.31151],
                                                                                      abs=1e-4)


def test_train_transform_matches_torchvision_and_is_seeded():
    img = pattern(40, 30)
    t = train_transform(8, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(0)
    x = t(img)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    # torchvision golden (module docstring): same RNG draws in the same order -> same crop, flip and pixels
    assert x.sum().item() == pytest.approx(40.0319, abs=1e-3)
    assert [x[0, 0, 0].item(), x[1, 3, 5].item(), x[2, 7, 7].item()] == pytest.approx([-0.40541, -0.28134, 0.24041],
                                                                                      abs=1e-4)
    torch.manual_seed(0)
    assert torch.equal(t(img), x)
    torch.manual_seed(1)
    assert not torch.equal(t(img), x)


def test_compose_applies_in_order():
    t = Compose([lambda v: v + 1, lambda v: v * 10])
    assert t(2) == 30


def test_pad_crop_is_mgca_geometry_pixel_for_pixel():
    """40x30 -> longer side 32 (x 256 / 224 of the crop 28), area-averaged: 32x24, pasted at row 4 of a black
    32x32 square; eval crops the centre 28x28 (offset 2, 2); then (x / 255 - 0.5) / 0.5."""
    img = pattern(40, 30)
    square = Image.new("RGB", (32, 32))
    square.paste(img.resize((32, 24), Image.BOX), (0, 4))
    want = (torch.from_numpy(arr(square.crop((2, 2, 30, 30)))).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    got = PadCrop(28, train=False)(img)
    assert got.shape == (3, 28, 28) and torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[:, :2], torch.full((3, 2, 28), -1.0))          # zero padding = -1 after Normalize
    assert torch.equal(PadCrop(28, train=False)(img.convert("L")), PadCrop(28, train=False)(img.convert("L")
                                                                                             .convert("RGB")))


def test_pad_crop_random_crop_draws_as_torchvision_and_moves_the_mask_with_the_image():
    # torchvision RandomCrop.get_params: i = randint(0, h - th + 1), then j = randint(0, w - tw + 1)
    torch.manual_seed(3)
    i, j = torch.randint(0, 5, (1,)).item(), torch.randint(0, 5, (1,)).item()
    torch.manual_seed(3)
    assert PadCrop(28, train=True).box() == (j, i, j + 28, i + 28)
    # a white 6x6 square in an image and the same square in its mask: still on the same pixels after any crop
    a = np.zeros((30, 40, 3), np.uint8)
    a[10:16, 20:26] = 255
    m = np.zeros((30, 40), np.uint8)
    m[10:16, 20:26] = 255
    boxes = set()
    for seed in range(6):
        torch.manual_seed(seed)
        t = PadCrop(28, train=True)
        x, mask = t(Image.fromarray(a), Image.fromarray(m, "L"))
        assert x.shape == (3, 28, 28) and mask.shape == (1, 28, 28) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask[0] > 0, x[0] > 0.5)        # the same pixels: the mask follows the image
        torch.manual_seed(seed)
        boxes.add(t.box())
    assert len(boxes) > 1                                    # the crop is random in training
