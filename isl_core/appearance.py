"""What the deformed atlases look like when Stage 3 fine-tunes on them: appearance matching and augmentation.

Registration makes the atlases match the inference image x* in *shape*; they keep the training cohort's
*appearance* (contrast phase, dose, reconstruction). Two kit extensions beyond the paper's abstract act on that:

* :func:`match_appearance` gives the warped atlases x*'s organ intensities and noise level, reading where each
  organ lies in x* from a guide map (:func:`atlas_consensus` of the warped atlases, or the current mask M);
  ``refine.appearance = "none"`` turns it off.
* :func:`augment` jitters intensities during fine-tuning so the network does not tie organ identity to one exact
  intensity. Its ranges are ``RefineConfig.augment_*``.
"""

from __future__ import annotations

import torch

from isl_core.config import RefineConfig


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Per-volume noise level: robust std (MAD) of the residual after a 3x3x3 mean filter, (B,1,...)."""
    smooth = torch.nn.functional.avg_pool3d(images, 3, stride=1, padding=1, count_include_pad=False)
    resid = (images - smooth).flatten(1)
    mad = (resid - resid.median(dim=1, keepdim=True).values).abs().median(dim=1).values
    # 1.4826 turns a MAD into a Gaussian standard deviation; sqrt(27/26) undoes the mean filter's share of the
    # voxel's own noise in the residual.
    return (1.4826 * mad * (27 / 26) ** 0.5).view(-1, *([1] * (images.ndim - 1)))


def match_appearance(warped_images: torch.Tensor, warped_onehot: torch.Tensor, image: torch.Tensor,
                     mask: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Give the warped atlases the inference image's appearance: organ intensities and noise level.

    For every class k the atlas intensities inside its (warped) label are shifted by
    ``mean(x* | M_k) - mean(atlas_i | y_i = k)``, where the guide ``mask`` tells where class k lies in x*; then
    noise is added up to x*'s noise level. A class that either side does not show keeps its intensities.

    Shapes: warped_images (N,1,*S), warped_onehot (N,C,*S), image (1,1,*S), mask (C,*S) or (1,C,*S).
    """
    m = mask.reshape(1, -1, *image.shape[2:]).to(image)
    w = warped_onehot.to(warped_images)
    target_mean = (m * image).flatten(2).sum(-1) / m.flatten(2).sum(-1).clamp_min(1e-3)  # (1,C)
    atlas_mean = (w * warped_images).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1e-3)  # (N,C)
    present = (m.flatten(2).sum(-1) > 1.0) & (w.flatten(2).sum(-1) > 1.0)  # both sides must show the class
    shift = torch.where(present, target_mean - atlas_mean, torch.zeros_like(atlas_mean))  # (N,C)
    out = warped_images + (w * shift[..., None, None, None]).sum(1, keepdim=True)
    extra = (noise_sigma(image) ** 2 - noise_sigma(warped_images) ** 2).clamp_min(0).sqrt()
    noise = torch.randn(out.shape, generator=gen).to(out) if gen is not None else torch.randn_like(out)
    return (out + extra * noise).clamp(0, 1)


def atlas_consensus(warped_onehot: torch.Tensor, agree: float = 0.5) -> torch.Tensor:
    """Where at least a fraction ``agree`` of the warped atlases put class k: a (C,*S) 0/1 map on x*'s grid.

    The appearance guide that does not depend on the segmenter: it shows where the registered atlases place
    each organ in x*, which is right for the organs registration aligns well even when P is wrong there.
    """
    return (warped_onehot.float().mean(0) >= agree).float()


def augment(images: torch.Tensor, gen: torch.Generator, cfg: RefineConfig) -> torch.Tensor:
    """Intensity augmentation on the device: gamma, contrast and offset per sample, plus Gaussian noise.

    Each sample draws ``gamma`` in ``cfg.augment_gamma``, a factor in ``cfg.augment_scale``, an offset in
    ``[-cfg.augment_shift, cfg.augment_shift]`` and a noise level in ``[0, cfg.augment_noise]``.
    """
    b = images.shape[0]
    shape = (b,) + (1,) * (images.ndim - 1)
    rand = torch.rand((4, *shape), generator=gen).to(images.device)
    (g_lo, g_hi), (s_lo, s_hi) = cfg.augment_gamma, cfg.augment_scale
    gamma = g_lo + (g_hi - g_lo) * rand[0]
    out = images.clamp(0, 1) ** gamma * (s_lo + (s_hi - s_lo) * rand[1]) + (rand[2] - 0.5) * (2 * cfg.augment_shift)
    noise = torch.randn(images.shape, generator=gen).to(images.device) * cfg.augment_noise * rand[3]
    return out + noise
