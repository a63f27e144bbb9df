"""What the two synthetic anatomies share: the drawn phantoms (``phantoms``) and the deformed real CT
(``sample_anatomy``) both take a subject's anatomical ``Variation`` and domain ``ShiftSpec``, the contrast phases'
HU tables, a random affine and a smooth elastic field from here, so neither reaches into the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Mean HU per tissue in the two contrast phases; the shift interpolates from "venous" (training) towards
# "native" (non-contrast), which changes organ-to-organ contrast the way a protocol change does.
HU_VENOUS = {"fat": -100, "muscle": 55, "bone": 450, "visceral": -80, "spinal_canal": 20,
             1: 125, 2: 170, 3: 170, 4: 10, 5: 50, 6: 115, 7: 35, 8: 160, 9: 140, 10: 170, 11: 100, 12: 60, 13: 60}
HU_NATIVE = {"fat": -100, "muscle": 50, "bone": 450, "visceral": -80, "spinal_canal": 20,
             1: 48, 2: 32, 3: 32, 4: 12, 5: 42, 6: 62, 7: 30, 8: 42, 9: 40, 10: 40, 11: 42, 12: 28, 13: 28}


@dataclass
class ShiftSpec:
    """How far an inference case departs from the training distribution (0: none, 1: the default shift)."""

    contrast: float = 1.0  # 0 venous phase (like training) ... 1 fully non-contrast
    noise: float = 1.0  # noise sigma multiplied by (1 + 1.5 * noise)
    blur: float = 1.0  # extra in-plane blur (mm) of 2.5 * blur
    body: float = 1.0  # body/fat scale + 0.12 * body

    @classmethod
    def scaled(cls, s: float) -> ShiftSpec:
        return cls(contrast=s, noise=s, blur=s, body=s)


@dataclass
class Variation:
    """How much subjects differ anatomically (inter-subject variation of the phantoms).

    The defaults are the kit's original phantoms (organ positions vary by about 4 mm, the elastic field by up to
    8 mm); ``VARIATIONS["inter-patient"]`` is closer to the variation between real abdominal CT scans.
    """

    elastic_mm: float = 8.0  # largest displacement of the smooth random elastic field
    organ_jitter_mm: float = 4.0  # standard deviation of each organ's own shift
    size_spread: float = 0.12  # ellipsoid semi-axes scaled by U(1 - s, 1 + s); tube radii by U(1 - 1.25 s, 1 + 1.25 s)
    gallbladder_absent: float = 0.2  # share of subjects without a gallbladder (after cholecystectomy)

    def __post_init__(self) -> None:
        for name in ("elastic_mm", "organ_jitter_mm", "size_spread", "gallbladder_absent"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"Variation.{name} = {value!r}: must be a finite number >= 0")
        if self.size_spread >= 0.8 or self.gallbladder_absent > 1:
            raise ValueError(f"Variation: size_spread must be < 0.8 and gallbladder_absent <= 1, got {self}")


#: Named anatomical variations of ``isl data synth --variation``.
VARIATIONS: dict[str, Variation] = {
    "default": Variation(),
    "inter-patient": Variation(elastic_mm=20.0, organ_jitter_mm=8.0, size_spread=0.2, gallbladder_absent=0.1),
}


def smooth_field(rng: np.random.Generator, size: tuple[int, int, int], amplitude_mm: float) -> np.ndarray:
    """A smooth random displacement (3,*size) in mm: coarse Gaussian noise, upsampled linearly, then smoothed.

    (Linear upsampling plus a Gaussian is ~50x faster than cubic-spline zoom and just as smooth here.)
    """
    coarse = rng.normal(0.0, 1.0, size=(3, 5, 5, 4))
    sigma = np.array(size) / np.array(coarse.shape[1:]) / 2.0
    field = np.stack([ndimage.gaussian_filter(ndimage.zoom(c, np.array(size) / np.array(c.shape), order=1), sigma)
                      for c in coarse])
    return (field * amplitude_mm / max(np.abs(field).max(), 1e-6)).astype(np.float32)


def random_affine(rng: np.random.Generator, body_scale: float) -> np.ndarray:
    """A 4x4 mm->mm transform: small rotations (<= 6 deg), anisotropic scale, translation (<= 10 mm)."""
    ax, ay, az = np.deg2rad(rng.uniform(-6, 6, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    scale = np.diag(rng.uniform(0.92, 1.08, 3) * np.array([body_scale, body_scale, 1.0]))
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ scale
    m[:3, 3] = rng.uniform(-10, 10, 3)
    return m
