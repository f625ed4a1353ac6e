"""Paired random augmentation with PIL + torch only: draw the parameters once, apply them to several images.

ALTA's training transform (RandomAffine(20 deg, shear 10, translate 0.1, scale 0.95-1.05) then ColorJitter
(brightness 0.8-1.2, contrast 0.8-1.2)) must move the current and the prior frontal image of a study the same
way (and the two laterals the same way); the official code re-seeds torchvision's global RNG before each image.
Here the parameters are an explicit value, drawn from a torch.Generator:

    p = AffineJitter.sample(generator)        # one draw
    a, b = aug(img_448, p), aug(img_224, p)   # the same rotation / shear / scale / jitter; the translation is
                                              # a fraction of each image's size, as torchvision's is
The geometry is torchvision's PIL path (inverse affine matrix about the image centre, nearest-neighbour
resampling, zero fill); the jitter is torchvision's PIL path (ImageEnhance brightness and contrast, applied in a
random order); tests/test_alta.py checks both pixel for pixel against torchvision (tests/goldens/alta_augment).
"""
import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class AffineJitterParams:
    angle: float          # degrees
    translate: tuple      # (dx, dy) as fractions of the image width / height
    scale: float
    shear: float          # degrees along x
    brightness: float
    contrast: float
    brightness_first: bool


class AffineJitter:
    def __init__(self, degrees=20.0, translate=0.1, scale=(0.95, 1.05), shear=10.0, brightness=(0.8, 1.2),
                 contrast=(0.8, 1.2)):
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear
        self.brightness, self.contrast = brightness, contrast

    def sample(self, g: torch.Generator) -> AffineJitterParams:
        u = torch.rand(7, generator=g).tolist()
        lerp = lambda lo, hi, t: lo + (hi - lo) * t
        return AffineJitterParams(angle=lerp(-self.degrees, self.degrees, u[0]),
                                  translate=(lerp(-self.translate, self.translate, u[1]),
                                             lerp(-self.translate, self.translate, u[2])),
                                  scale=lerp(*self.scale, u[3]), shear=lerp(-self.shear, self.shear, u[4]),
                                  brightness=lerp(*self.brightness, u[5]), contrast=lerp(*self.contrast, u[6]),
                                  brightness_first=bool(torch.rand(1, generator=g).item() < 0.5))

    @staticmethod
    def inverse_matrix(p: AffineJitterParams, width: int, height: int) -> list:
        """torchvision's _get_inverse_affine_matrix (output pixel -> input pixel), centre (w/2, h/2), translation
        in pixels rounded as torchvision rounds it."""
        tx, ty = round(p.translate[0] * width), round(p.translate[1] * height)
        cx, cy = width * 0.5, height * 0.5
        rot, sx = math.radians(p.angle), math.radians(p.shear)
        a, b = math.cos(rot), -math.cos(rot) * math.tan(sx) - math.sin(rot)
        c, d = math.sin(rot), -math.sin(rot) * math.tan(sx) + math.cos(rot)
        m = [v / p.scale for v in (d, -b, 0.0, -c, a, 0.0)]
        m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
        m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
        return m

    def __call__(self, img: Image.Image, p: AffineJitterParams) -> Image.Image:
        if p is None:
            return img
        w, h = img.size
        img = img.transform((w, h), Image.AFFINE, self.inverse_matrix(p, w, h), Image.NEAREST, fillcolor=0)
        ops = [lambda x: ImageEnhance.Brightness(x).enhance(p.brightness),
               lambda x: ImageEnhance.Contrast(x).enhance(p.contrast)]
        for op in (ops if p.brightness_first else ops[::-1]):
            img = op(img)
        return img
