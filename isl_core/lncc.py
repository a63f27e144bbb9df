"""A fast local normalised cross-correlation (LNCC), numerically equal to MONAI's rectangular-window LNCC.

Why this module exists
----------------------
``monai.losses.LocalNormalizedCrossCorrelationLoss`` filters five images (t, p, t*t, p*p, t*p) with a
separable kernel implemented as grouped ``conv3d`` calls, and lets autograd differentiate the whole chain.
Grouped 3-D convolutions are slow on CPU and GPU, MONAI re-filters the *fixed* image at every call although
it never changes during a registration, and autograd keeps a dozen full-size intermediates per call. On one
H100, 24 atlases at 128x128x96 for 100 iterations took 28 s, which makes the inference-specific loop
impractical. Three changes compute the same quantity much faster:

1. **Box sums in O(1) per voxel.** A rectangular window sum along an axis is either a difference of two
   prefix sums (``cumsum``; fastest on CPU) or a stride-1 ``avg_pool`` with ``divisor_override=1`` (one
   read and one write per axis; fastest on GPU). Neither does ``k`` multiply-adds per voxel.
2. **The fixed image is filtered once** (:meth:`FastLNCC.target_stats`) and reused for every atlas and
   every iteration; per step only ``p``, ``p*p`` and ``t*p`` are filtered, stacked into one call.
3. **A hand-derived backward pass** (:class:`_NCCMap`) that needs one more box-sum call and a few
   element-wise passes instead of autograd's chain of saved intermediates.

The plain autograd formula is kept (:meth:`FastLNCC.ncc` with ``analytic=False``) as the readable reference;
the tests check that both agree with MONAI to 1e-4 and with each other in their gradients.

Numerics: box sums by prefix sums lose a few more float32 bits than direct sums. On random inputs the
result equals MONAI's to 1e-4. On piecewise-constant images (synthetic phantoms, air) *any* float32
implementation, MONAI's included, turns rounding noise in flat windows into spurious correlations, because
MONAI's default variance floor ``smooth_dr=1e-5`` is below the rounding error of the window sums.
Registration and fusion therefore pass a larger floor (:func:`variance_floor_for`), which makes flat
windows count as "no information" rather than as noise amplifiers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Default floor on the *per-voxel* local variance used by registration and fusion: an intensity standard
#: deviation of 0.01 on the [0, 1] scale (about 4 HU with the abdominal CT window) counts as flat.
DEFAULT_VAR_FLOOR = 1e-4


def variance_floor_for(kernel_size: int, spatial_dims: int = 3, var_floor: float = DEFAULT_VAR_FLOOR) -> float:
    """``smooth_dr`` that floors the local variance at ``var_floor`` (MONAI's floor acts on window *sums*)."""
    return float(var_floor * kernel_size**spatial_dims)


def _prefix_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.cumsum(dim)``, the same bits; an outer axis is summed in a copy where it is the innermost one.

    torch's CPU cumulative sum walks an outer axis with a large stride, several times slower than along the
    innermost (contiguous) axis; a transposed copy plus the fast sum costs less for the outermost spatial axis (for
    the middle one the copy costs more than it saves; measured, README "Speed"). Every line is summed in the same
    order either way, so the result does not change.
    """
    if x.is_cuda or dim >= x.ndim - 2 or x.shape[dim] < 3:
        return x.cumsum(dim)
    return x.movedim(dim, -1).contiguous().cumsum(-1).movedim(-1, dim)


def box_sum_cumsum(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Window sums (zero padding) via prefix sums: ``out[i] = c[min(i + h, n - 1)] - c[i - h - 1]``.

    ``c`` is the cumulative sum along the axis and ``c[j < 0] = 0``. Written with slices instead of padding the
    input, which saves a full copy per axis, and with the interior differences written straight into the result
    (``out=``): one pass over the axis after the cumulative sum instead of a copy followed by an in-place
    subtraction. The arithmetic, and so every bit of the result, is the same either way.
    """
    h = kernel_size // 2
    for dim in range(2, x.ndim):
        n = x.shape[dim]
        c = _prefix_sums(x, dim)
        out = torch.empty_like(c)
        m = max(n - 2 * h - 1, 0)  # interior: the window lies inside the axis, c[i + h] - c[i - h - 1]
        if m:
            torch.sub(c.narrow(dim, 2 * h + 1, m), c.narrow(dim, 0, m), out=out.narrow(dim, h + 1, m))
        head = min(h + 1, n)  # i <= h: the window starts at the first voxel, nothing to subtract
        inside = min(head, max(n - h, 0))  # ... and ends inside the axis
        if inside:
            out.narrow(dim, 0, inside).copy_(c.narrow(dim, h, inside))
        if head > inside:
            out.narrow(dim, inside, head - inside).copy_(c.narrow(dim, n - 1, 1).expand_as(
                out.narrow(dim, inside, head - inside)))
        start = max(h + 1, n - h)  # the window ends past the last voxel: c[n - 1] - c[i - h - 1]
        if start < n:
            tail = out.narrow(dim, start, n - start)
            torch.sub(c.narrow(dim, n - 1, 1).expand_as(tail), c.narrow(dim, start - h - 1, n - start), out=tail)
        x = out
    return x


def box_sum_pool(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Window sums (zero padding) via one stride-1 ``avg_pool`` per axis that does not divide."""
    if x.ndim != 5 or min(x.shape[2:]) < kernel_size:
        # avg_pool3d is 3-D only and refuses axes shorter than the window; prefix sums handle both.
        return box_sum_cumsum(x, kernel_size)
    half = kernel_size // 2
    for axis in range(3):
        k, p = [1, 1, 1], [0, 0, 0]
        k[axis], p[axis] = kernel_size, half
        x = F.avg_pool3d(x, k, stride=1, padding=p, count_include_pad=True, divisor_override=1)
    return x


def _box_sum(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    # Measured: prefix sums win on CPU (the CPU pooling kernel loops over the window), pooling wins on GPU
    # (fewer passes over memory; the window stays in cache).
    return box_sum_pool(x, kernel_size) if x.is_cuda else box_sum_cumsum(x, kernel_size)


class _BoxSum(torch.autograd.Function):
    # A zero-padded centred window sum is a symmetric linear operator, so its adjoint (the backward pass)
    # is the same window sum: one forward-sized computation instead of autograd's pad/cumsum/narrow chain.
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        ctx.kernel_size = kernel_size
        return _box_sum(x, kernel_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _box_sum(grad.contiguous(), ctx.kernel_size), None


def box_sum(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Sum over a centred ``kernel_size`` window along every spatial axis of (B, C, *spatial), zero padding.

    Same result as MONAI's ``separable_filtering`` with a ones kernel; the cost does not grow with the kernel.
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    return _BoxSum.apply(x, kernel_size)


class TargetStats(NamedTuple):
    """Window statistics of the fixed image, reused across atlases and iterations."""

    target: torch.Tensor  # (B or 1, C, *spatial)
    t_sum: torch.Tensor  # window sums of t
    t_var: torch.Tensor  # window sums of (t - mean)^2, already floored at smooth_dr


class _NCCMap(torch.autograd.Function):
    """Per-voxel squared NCC with a hand-derived gradient with respect to ``pred`` only.

    With window sums S_p, S_pp, S_tp, S_t over K voxels:
        cross = S_tp - S_p S_t / K,   pv = max(S_pp - S_p^2 / K, dr),   ncc = (cross^2 + nr) / (tv pv).
    For an upstream gradient g (per voxel), with A = 2 g cross / (tv pv) and B = g ncc / pv where pv is not
    floored (0 elsewhere):
        dL/dS_tp = A,   dL/dS_p = (2 B S_p - A S_t) / K,   dL/dS_pp = -B,
    and because each window sum is a symmetric box filter, pulling these back to the voxels of ``pred`` is
    one more box sum:
        dL/dp = t * box(A) + box((2 B S_p - A S_t) / K) - 2 p * box(B).
    """

    # Both passes write their stacked inputs of the box sum in place and update intermediates in place: the same
    # operations in the same order as the formulas above (bit for bit, tests/test_register.py), with fewer
    # full-size allocations and no concatenation copy. Both run once in every registration step.
    @staticmethod
    def forward(ctx, pred, t, t_sum, t_var, kernel_size: int, smooth_nr: float, smooth_dr: float):
        kv = float(kernel_size ** (pred.ndim - 2))
        c = pred.shape[1]
        stack = pred.new_empty(pred.shape[0], 3 * c, *pred.shape[2:])
        s_p, s_pp, s_tp = stack.split(c, 1)
        s_p.copy_(pred)
        torch.mul(pred, pred, out=s_pp)
        torch.mul(pred, t.expand_as(pred), out=s_tp)
        p_sum, p2_sum, tp_sum = _box_sum(stack, kernel_size).split(c, 1)
        cross = torch.mul(p_sum, t_sum).div_(kv)
        cross = torch.sub(tp_sum, cross, out=cross)  # S_tp - S_p S_t / K
        p_var_raw = torch.mul(p_sum, p_sum).div_(kv)
        p_var_raw = torch.sub(p2_sum, p_var_raw, out=p_var_raw)
        den = torch.clamp_min(p_var_raw, smooth_dr, out=p2_sum)  # S_pp is not needed any more
        den = torch.mul(t_var, den, out=den)
        ncc = torch.mul(cross, cross)
        if smooth_nr:
            ncc.add_(smooth_nr)
        ncc.div_(den)
        ctx.save_for_backward(pred, t, t_sum, t_var, p_sum, cross, p_var_raw)
        ctx.consts = (kernel_size, kv, smooth_nr, smooth_dr)
        return ncc

    @staticmethod
    def backward(ctx, g):
        pred, t, t_sum, t_var, p_sum, cross, p_var_raw = ctx.saved_tensors
        kernel_size, kv, smooth_nr, smooth_dr = ctx.consts
        c = pred.shape[1]
        p_var = p_var_raw.clamp_min(smooth_dr)
        g_over = torch.mul(t_var, p_var)
        g_over = torch.div(g, g_over, out=g_over)
        stack = pred.new_empty(pred.shape[0], 3 * c, *pred.shape[2:])
        a, s, b = stack.split(c, 1)
        torch.mul(g_over, 2.0, out=a).mul_(cross)  # A = 2 g cross / (tv pv)
        torch.mul(cross, cross, out=b)
        if smooth_nr:
            b.add_(smooth_nr)
        # B = g ncc / pv; where the variance is floored it is a constant, so that path carries no gradient
        b.mul_(g_over).div_(p_var).masked_fill_((p_var_raw > smooth_dr).logical_not_(), 0.0)
        torch.mul(b, 2.0, out=s).mul_(p_sum).sub_(torch.mul(a, t_sum)).div_(kv)  # (2 B S_p - A S_t) / K
        box_a, box_s, box_b = _box_sum(stack, kernel_size).split(c, 1)
        grad = torch.mul(t.expand_as(pred), box_a).add_(box_s)
        return grad.sub_(box_b.mul_(2.0 * pred)), None, None, None, None, None, None


class FastLNCC(torch.nn.Module):
    """Local squared zero-normalised cross-correlation with a rectangular window, as a loss (lower is better).

    Same definition, arguments and sign as ``monai.losses.LocalNormalizedCrossCorrelationLoss(
    kernel_type="rectangular")``: the loss is ``-ncc**2`` averaged (``reduction="mean"``), summed, or
    returned per voxel (``"none"``). Extras: ``reduction="batch"`` returns one mean per batch element
    (registration sums those so that every atlas is optimised independently); ``target`` may have batch
    size 1 and is then broadcast over the batch of ``pred`` (one fixed image, many atlases); ``target`` may
    be the precomputed :class:`TargetStats`.
    """

    def __init__(self, spatial_dims: int = 3, kernel_size: int = 3, reduction: str = "mean",
                 smooth_nr: float = 0.0, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if reduction not in ("mean", "sum", "none", "batch"):
            raise ValueError(f"unsupported reduction {reduction!r}; use mean, sum, none or batch")
        self.spatial_dims = spatial_dims
        self.kernel_size = kernel_size
        self.kernel_vol = float(kernel_size**spatial_dims)
        self.reduction = reduction
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def target_stats(self, target: torch.Tensor) -> TargetStats:
        """Filter the fixed image once; pass the result to :meth:`forward` in place of the image."""
        t_sum, t2_sum = box_sum(torch.cat([target, target * target], dim=1), self.kernel_size).chunk(2, dim=1)
        t_var = (t2_sum - t_sum * t_sum / self.kernel_vol).clamp_min(self.smooth_dr)
        return TargetStats(target, t_sum, t_var)

    def ncc(self, pred: torch.Tensor, target: torch.Tensor | TargetStats, analytic: bool = True) -> torch.Tensor:
        """Per-voxel squared NCC (in [0, 1] up to rounding), shape of ``pred``.

        ``analytic=True`` uses the hand-derived backward pass; it is taken automatically unless the
        target itself needs a gradient (then the plain autograd formula below is used).
        """
        if pred.ndim - 2 != self.spatial_dims:
            raise ValueError(f"expected {self.spatial_dims} spatial dims, got pred of shape {tuple(pred.shape)}")
        stats = target if isinstance(target, TargetStats) else self.target_stats(target)
        t = stats.target
        if t.shape[1:] != pred.shape[1:] or t.shape[0] not in (1, pred.shape[0]):
            raise ValueError(f"target shape {tuple(t.shape)} does not match pred shape {tuple(pred.shape)}")
        if analytic and not t.requires_grad:
            return _NCCMap.apply(pred, t, stats.t_sum, stats.t_var, self.kernel_size, self.smooth_nr,
                                 self.smooth_dr)
        # Reference formula, same algebra as MONAI: cross = S_tp - S_p * mean(t); var = S_xx - S_x * mean(x).
        c = pred.shape[1]
        sums = box_sum(torch.cat([pred, pred * pred, pred * t.expand_as(pred)], dim=1), self.kernel_size)
        p_sum, p2_sum, tp_sum = sums.split(c, dim=1)
        cross = tp_sum - p_sum * stats.t_sum / self.kernel_vol
        p_var = (p2_sum - p_sum * p_sum / self.kernel_vol).clamp_min(self.smooth_dr)
        return (cross * cross + self.smooth_nr) / (stats.t_var * p_var)

    def forward(self, pred: torch.Tensor, target: torch.Tensor | TargetStats) -> torch.Tensor:
        ncc = self.ncc(pred, target)
        if self.reduction == "mean":
            return ncc.mean().neg()
        if self.reduction == "sum":
            return ncc.sum().neg()
        if self.reduction == "batch":
            return ncc.flatten(1).mean(1).neg()
        return ncc.neg()
