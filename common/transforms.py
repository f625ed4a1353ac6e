"""
Image transforms with PIL + torch only (no torchvision), written to match torchvision's PIL code path.

The CLIP/CoOp recipe every method here uses:
    train: RandomResizedCrop(size, scale=(0.08, 1), bicubic) -> RandomHorizontalFlip -> ToTensor -> Normalize
    eval:  Resize(size) (shorter side, bicubic) -> CenterCrop(size) -> ToTensor -> Normalize

Geometric transforms (Resize, CenterCrop, RandomResizedCrop) take and return PIL images; ToTensor turns a PIL
image into a float (C, H, W) tensor in [0, 1]; Normalize works on that tensor. RandomHorizontalFlip and ToRGB
accept either.

All randomness comes from torch's global RNG (torch.rand / torch.randint / Tensor.uniform_), drawn in the same
order as torchvision, so `torch.manual_seed(s)` makes a pipeline reproducible (and gives the same crop boxes as
torchvision for the same seed), and DataLoader workers, which torch seeds per worker, get different streams.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F_nn
from PIL import Image

# Per-channel (R, G, B) statistics. CLIP's are the ones OpenAI computed on its training set; use the ones the
# pretrained vision tower was trained with, not the ones of your dataset.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1]; CLEFT uses this (even with a DINOv2 tower)
HALF_STD = (0.5, 0.5, 0.5)

# -----------------------------------------------------------------------------
# helpers


def _pair(size):
    """int -> (size, size); (h, w) -> (h, w)."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _check_pil(img, name):
    """Geometric transforms are PIL-only; fail loudly rather than silently doing something else on a tensor."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"{name} expects a PIL image, got {type(img).__name__}; put it before ToTensor()")


# -----------------------------------------------------------------------------
# transforms


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self):
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose({inner}\n)"


class Resize:
    """
    Resize so the shorter side equals `size` (an int), keeping the aspect ratio, like torchvision's Resize(int):
    the longer side is int(size * long / short), i.e. truncated, not rounded. With a (h, w) tuple, resize to
    exactly that. Bicubic; PIL's resize antialiases when shrinking, as torchvision's PIL path does.
    """

    def __init__(self, size, interpolation=Image.BICUBIC):
        self.size = size
        self.interpolation = interpolation

    def output_size(self, w, h):
        """(new_w, new_h) for an input of width w and height h."""
        if not isinstance(self.size, int):
            th, tw = _pair(self.size)
            return tw, th
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def __call__(self, img):
        _check_pil(img, "Resize")
        new_w, new_h = self.output_size(*img.size)
        if (new_w, new_h) == img.size:
            return img  # torchvision returns the input untouched too (no resampling blur)
        return img.resize((new_w, new_h), self.interpolation)

    def __repr__(self):
        return f"Resize({self.size})"


class CenterCrop:
    """
    Crop the centre (th, tw) box with torchvision's rounding: top = int(round((h - th) / 2)), and Python's round
    is round-half-to-even: (7 - 2) / 2 = 2.5 -> 2, (6 - 3) / 2 = 1.5 -> 2, (3 - 2) / 2 = 0.5 -> 0.
    If the image is smaller than the crop it is zero-padded first, the way torchvision does it.
    """

    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img):
        _check_pil(img, "CenterCrop")
        th, tw = self.size
        w, h = img.size
        if th > h or tw > w:
            # zero-pad to at least (th, tw); the extra pixel of an odd padding goes right/bottom, as in torchvision
            left = (tw - w) // 2 if tw > w else 0
            top = (th - h) // 2 if th > h else 0
            padded = Image.new(img.mode, (max(w, tw), max(h, th)))
            padded.paste(img, (left, top))
            img, (w, h) = padded, padded.size
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def __repr__(self):
        return f"CenterCrop({self.size})"


class RandomResizedCrop:
    """
    torchvision's RandomResizedCrop: up to 10 attempts to sample a box whose area is a uniform fraction in `scale`
    of the image and whose aspect ratio w/h is log-uniform in `ratio`; if none fits, take the central crop with
    the aspect ratio clamped into `ratio`. The box is then resized to (size, size), bicubic.
    NOTE scale=(0.08, 1) is aggressive (a crop can be 8% of the image); for small lesions you may want more.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation=Image.BICUBIC):
        self.size = _pair(size)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation

    @staticmethod
    def get_params(width, height, scale, ratio):
        """Sample a crop box (top, left, h, w). Same RNG calls, in the same order, as torchvision's get_params."""
        area = height * width
        log_ratio = torch.log(torch.tensor(ratio))  # float32 on purpose: same numbers as torchvision
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return top, left, h, w
        # fallback: central crop, aspect ratio clamped into [min(ratio), max(ratio)]
        in_ratio = width / height
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        _check_pil(img, "RandomResizedCrop")
        top, left, h, w = self.get_params(img.size[0], img.size[1], self.scale, self.ratio)
        th, tw = self.size
        return img.crop((left, top, left + w, top + h)).resize((tw, th), self.interpolation)

    def __repr__(self):
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror left-right with probability p. Works on a PIL image or a (..., H, W) tensor."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if torch.rand(1).item() < self.p:
            if isinstance(img, Image.Image):
                return img.transpose(Image.FLIP_LEFT_RIGHT)
            return img.flip(-1)
        return img

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class ToRGB:
    """
    Make an image 3-channel: grayscale (or palette, RGBA, ...) PIL -> "RGB"; a (1, H, W) tensor -> (3, H, W).
    CLIP-style towers expect 3 channels, and X-rays are usually stored as 1-channel grayscale.
    """

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return img if img.mode == "RGB" else img.convert("RGB")
        if img.dim() >= 3 and img.shape[-3] == 1:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).contiguous()
        return img

    def __repr__(self):
        return "ToRGB()"


class ToTensor:
    """PIL image -> float32 tensor (C, H, W); 8-bit images are scaled to [0, 1] (divided by 255)."""

    def __call__(self, img):
        _check_pil(img, "ToTensor")
        a = np.array(img)  # (H, W) or (H, W, C); a writable copy (torch warns on read-only arrays)
        if a.ndim == 2:
            a = a[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # (C, H, W)
        if a.dtype == np.uint8:
            return x.float().div_(255.0)
        if a.dtype == bool:
            return x.float()
        # 16/32-bit or float modes: keep the raw values, as torchvision does; load_image() already maps
        # 16-bit files to 8-bit RGB, so this only happens if you open images yourself
        return x.float()

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    """(x - mean) / std per channel, on a float tensor (C, H, W) or (B, C, H, W)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if (self.std <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {std}")

    def __call__(self, x):
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError("Normalize expects a float tensor; put ToTensor() before it")
        if x.shape[-3] != self.mean.shape[0]:
            raise ValueError(f"Normalize: image has {x.shape[-3]} channels, mean/std have {self.mean.shape[0]}"
                             " (grayscale image? add ToRGB())")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def __repr__(self):
        return f"Normalize(mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})"


# -----------------------------------------------------------------------------
# the CLIP / CoOp recipe


def train_transform(size=224, mean=CLIP_MEAN, std=CLIP_STD):
    """Training augmentation of CoOp/CILMP: random resized crop (scale 0.08-1, bicubic) + flip, then normalise."""
    return Compose([
        ToRGB(),
        RandomResizedCrop(size, scale=(0.08, 1.0)),
        RandomHorizontalFlip(),
        ToTensor(),
        Normalize(mean, std),
    ])


def eval_transform(size=224, mean=CLIP_MEAN, std=CLIP_STD):
    """Deterministic evaluation pipeline: shorter side to `size` (bicubic), centre crop, normalise."""
    return Compose([
        ToRGB(),
        Resize(size),
        CenterCrop(size),
        ToTensor(),
        Normalize(mean, std),
    ])


# -----------------------------------------------------------------------------
# the CLEFT pipeline for X-rays and mammograms (XYPB/CLEFT datasets/utils.py get_imgs and datasets/transforms.py
# Moco2Transform), on grayscale PIL images ("L"); ToRGB at the end replicates the channel, which is what the
# official RGB pipeline computes on a gray image (every step acts on the three equal channels alike)


class ToGray:
    """Any PIL image -> 8-bit grayscale "L" (ITU-R 601-2 luma, the formula cv2's gray conversion uses)."""

    def __call__(self, img):
        _check_pil(img, "ToGray")
        return img if img.mode == "L" else img.convert("RGB").convert("L")

    def __repr__(self):
        return "ToGray()"


class LongestSidePad:
    """Resize so the longer side is `size` (the shorter one truncated to int, as the official resize_img), then
    zero-pad the shorter side to `size`, centred (the odd pixel goes right / bottom). Area averaging (PIL BOX,
    cv2 INTER_AREA officially) when shrinking, bilinear when enlarging; `resample` (e.g. Image.NEAREST for a mask)
    replaces that choice."""

    def __init__(self, size=256, resample=None):
        self.size, self.resample = size, resample

    def __call__(self, img):
        _check_pil(img, "LongestSidePad")
        w, h = img.size
        if h >= w:
            new_w, new_h = int(w * self.size / h), self.size
        else:
            new_w, new_h = self.size, int(h * self.size / w)
        shrink = new_w <= w and new_h <= h
        resample = self.resample if self.resample is not None else Image.BOX if shrink else Image.BILINEAR
        img = img.resize((max(new_w, 1), max(new_h, 1)), resample)
        out = Image.new(img.mode, (self.size, self.size))
        out.paste(img, ((self.size - img.size[0]) // 2, (self.size - img.size[1]) // 2))
        return out

    def __repr__(self):
        return f"LongestSidePad({self.size})"


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image, as cv2.threshold(..., THRESH_OTSU) computes it: the t in 0..255 that
    maximises the between-class variance q1 q2 (mu1 - mu2)^2 of {<= t} and {> t} (the first t on a tie);
    pixels > t are the foreground."""
    hist = np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    levels = np.arange(256, dtype=np.float64)
    q1 = np.cumsum(p)                                   # weight of {<= t}
    q2 = 1.0 - q1
    cum_mean = np.cumsum(p * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = cum_mean / q1
        mu2 = (cum_mean[-1] - cum_mean) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
    eps = np.finfo(np.float32).eps                      # cv2 skips a t with an (almost) empty class
    sigma[(np.minimum(q1, q2) < eps) | (np.maximum(q1, q2) > 1 - eps)] = -1.0
    return int(np.argmax(sigma)) if sigma.max() > 0 else 0


class OtsuCrop:
    """Crop to the bounding box of the Otsu foreground (pixels above otsu_threshold), the official OtsuCut: it
    removes the zero padding and dark borders around an X-ray or a breast. An image without foreground is
    returned as it is."""

    def __call__(self, img):
        _check_pil(img, "OtsuCrop")
        gray = np.asarray(img.convert("L") if img.mode != "L" else img)
        mask = gray > otsu_threshold(gray)
        if not mask.any():
            return img
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        return img.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))

    def __repr__(self):
        return "OtsuCrop()"


class RandomApply:
    """Apply `transform` with probability p (torchvision's RandomApply: one torch.rand draw)."""

    def __init__(self, transform, p):
        self.transform, self.p = transform, p

    def __call__(self, img):
        return img if self.p < torch.rand(1).item() else self.transform(img)

    def __repr__(self):
        return f"RandomApply({self.transform!r}, p={self.p})"


class BrightnessContrastJitter:
    """torchvision ColorJitter(brightness=b, contrast=c) on a PIL image: factors uniform in [1 - b, 1 + b] and
    [1 - c, 1 + c], applied in a random order, with PIL's ImageEnhance as torchvision's PIL path does."""

    def __init__(self, brightness=0.2, contrast=0.2):
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, img):
        from PIL import ImageEnhance
        order = torch.randperm(4).tolist()                # torchvision draws an order of its four jitters
        b = float(torch.empty(1).uniform_(1 - self.brightness, 1 + self.brightness))
        c = float(torch.empty(1).uniform_(1 - self.contrast, 1 + self.contrast))
        for i in order:
            if i == 0:
                img = ImageEnhance.Brightness(img).enhance(b)
            elif i == 1:
                img = ImageEnhance.Contrast(img).enhance(c)
        return img

    def __repr__(self):
        return f"BrightnessContrastJitter({self.brightness}, {self.contrast})"


class GaussianBlur:
    """torchvision GaussianBlur(kernel, sigma=(lo, hi)): sigma uniform in [lo, hi], a kernel x kernel Gaussian
    (taps at -k//2..k//2), reflect padding, rounded back to uint8."""

    def __init__(self, kernel=7, sigma=(0.1, 2.0)):
        self.kernel, self.sigma = kernel, sigma

    def __call__(self, img):
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        half = (self.kernel - 1) * 0.5
        taps = torch.exp(-0.5 * (torch.linspace(-half, half, self.kernel) / sigma) ** 2)
        taps = taps / taps.sum()
        x = torch.from_numpy(np.array(img, dtype=np.float32))
        x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[:, None]  # (C, 1, H, W)
        k = self.kernel // 2
        x = F_nn.pad(x, (k, k, k, k), mode="reflect")
        x = F_nn.conv2d(F_nn.conv2d(x, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
        out = x.round().clamp(0, 255).to(torch.uint8)[:, 0]  # (C, H, W)
        return Image.fromarray(out[0].numpy() if out.shape[0] == 1 else out.permute(1, 2, 0).numpy(), img.mode)

    def __repr__(self):
        return f"GaussianBlur({self.kernel}, sigma={self.sigma})"


class RandomAffine:
    """torchvision RandomAffine(degrees, translate, scale) without shear, nearest-neighbour, zero fill: an angle
    uniform in [-degrees, degrees], a shift of up to translate * size (rounded to pixels), a scale uniform in
    `scale`, about the image centre (PIL's inverse-matrix transform, as torchvision's PIL path)."""

    def __init__(self, degrees=10.0, translate=(0.0625, 0.0625), scale=(0.8, 1.1)):
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, img):
        w, h = img.size
        angle = float(torch.empty(1).uniform_(-self.degrees, self.degrees))
        max_dx, max_dy = self.translate[0] * w, self.translate[1] * h
        tx = int(round(torch.empty(1).uniform_(-max_dx, max_dx).item()))
        ty = int(round(torch.empty(1).uniform_(-max_dy, max_dy).item()))
        s = float(torch.empty(1).uniform_(*self.scale))
        rot, cx, cy = math.radians(angle), w * 0.5, h * 0.5
        # inverse of: translate(c + t) . rotate . scale . translate(-c)
        m = [math.cos(rot) / s, math.sin(rot) / s, 0.0, -math.sin(rot) / s, math.cos(rot) / s, 0.0]
        m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
        m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
        return img.transform((w, h), Image.AFFINE, m, resample=Image.NEAREST, fillcolor=0)

    def __repr__(self):
        return f"RandomAffine({self.degrees}, translate={self.translate}, scale={self.scale})"


def official_cleft_transform(size=224, train=False):
    """The official CLEFT image pipeline (see the section comment), scaled to `size`: longest side to
    size * 256 / 224 with zero padding, Otsu crop, resize to size x size; in training brightness / contrast
    jitter (p 0.4), blur (p 0.4), affine, flip; then 3 gray channels, Normalize(0.5, 0.5)."""
    steps = [ToGray(), LongestSidePad(round(size * 256 / 224)), OtsuCrop(), Resize((size, size), Image.BILINEAR)]
    if train:
        steps += [RandomApply(BrightnessContrastJitter(0.2, 0.2), p=0.4), RandomApply(GaussianBlur(7, (0.1, 2.0)), p=0.4),
                  RandomAffine(10.0, (0.0625, 0.0625), (0.8, 1.1)), RandomHorizontalFlip()]
    return Compose(steps + [ToRGB(), ToTensor(), Normalize(HALF_MEAN, HALF_STD)])


# -----------------------------------------------------------------------------
# the MGCA pipeline (Adaptor, and the MGCA family of chest X-ray methods)


class PadCrop:
    """MGCA's get_imgs + crop, the Adaptor's image pipeline: the longer side to load = size x 256 / 224 keeping the
    aspect ratio (area averaging when shrinking, as cv2 INTER_AREA), zero-padded to a centred square
    (LongestSidePad), then a random crop of `size` (train: torchvision RandomCrop's draws, top then left) or the
    centre one (CenterCrop's rounding), ToTensor, Normalize(0.5, 0.5) (used for DINOv2 too, as official).
    Colour is kept: the official reads grayscale, which is the same numbers for a gray X-ray.

    PadCrop(size, train)(image) -> (3, S, S); (image, mask) -> ((3, S, S), (1, S, S) in {0, 1}), the mask with the
    same geometry (nearest), so it works as SegmentationDataset's joint_transform."""

    def __init__(self, size: int, train: bool):
        self.size, self.train = size, train
        self.pad = LongestSidePad(round(size * 256 / 224))
        self.mask_pad = LongestSidePad(self.pad.size, resample=Image.NEAREST)
        self.norm = Normalize(HALF_MEAN, HALF_STD)

    def box(self):
        """(left, top, right, bottom) of this call's crop in the padded square."""
        off = self.pad.size - self.size
        if self.train:
            top, left = (int(torch.randint(0, off + 1, (1,))) for _ in range(2))
        else:
            top = left = int(round(off / 2))
        return left, top, left + self.size, top + self.size

    def __call__(self, image, mask=None):
        box = self.box()
        x = self.norm(ToTensor()(self.pad(ToRGB()(image)).crop(box)))                         # (3, S, S)
        if mask is None:
            return x
        m = np.asarray(self.mask_pad(mask.convert("L")).crop(box)) >= 128
        return x, torch.from_numpy(m).float()[None]                                            # (1, S, S)

    def __repr__(self):
        return f"PadCrop({self.size}, train={self.train})"
