"""Small helpers shared by several test modules: tiny cohorts and profiles that run in seconds on 2 cores."""

from __future__ import annotations

from pathlib import Path

from isl_core.config import Profile, get_profile

TINY_METHODS = ["baseline", "malf", "isl-mask-ema"]
TINY_SIZE = (32, 32, 24)  # voxels of the tiny cohorts: every stage runs, in about a second per case


def tiny_cohort(path: Path, seed: int = 3) -> Path:
    """6 labelled phantoms at 32x32x24 (4 training, 2 validation): 2 folds of 3 cases."""
    from isl_core.phantoms import CohortSpec, write_cohort

    return write_cohort(path, CohortSpec(n_train=4, n_val=2, n_test=0, size=(32, 32, 24), seed=seed))


def tiny_profile() -> Profile:
    """The ci profile cut to a few steps: every stage runs (mask supervision in round 2), the numbers mean nothing."""
    return get_profile("ci", segment={"max_steps": 4, "val_every": 4, "checkpoint_every": 4},
                       register={"iterations": 3, "warm_start_iterations": 2},
                       refine={"finetune_steps": 1, "ema_every": 1})


def loop_profile(rounds: int = 2, steps: int = 6, every: int = 3, beta: float = 0.6, mask_from_round: int = 1
                 ) -> Profile:
    """The ci profile with the ISL loop's schedule set by hand (the refine and sharing tests)."""
    p = get_profile("ci")
    p.refine.mask_from_round = mask_from_round
    p.refine.rounds, p.refine.finetune_steps, p.refine.ema_every, p.refine.beta = rounds, steps, every, beta
    p.refine.batch_size = 1
    return p


# The ci-sized check of claim C1 (tests/test_c1.py) and the measurement of its bound (bench/c1_bound.py) share
# this setting: a baseline trained long enough to segment the training protocol's phantoms, inferred on phantoms
# with the domain shift, where ISL has something to correct.
C1_SIZE = (64, 64, 40)


def c1_cohort(path: Path, seed: int = 0) -> Path:
    """6 training phantoms and 4 shifted inference phantoms at 64x64x40 (the ci grid's 8 mm voxels)."""
    from isl_core.phantoms import CohortSpec, write_cohort

    return write_cohort(path, CohortSpec(n_train=6, n_val=4, n_test=0, size=C1_SIZE, seed=seed, shift=1.0))


def c1_profile() -> Profile:
    """The ci profile with a baseline of 150 steps (at 60 it segments almost nothing, and C1 would be vacuous)."""
    return get_profile("ci", segment={"max_steps": 150, "val_every": 150, "checkpoint_every": 150})


def real_loop_setup(num_classes: int = 3, n_atlases: int = 2, size: tuple[int, int, int] = (16, 16, 16)):
    """A real tiny network, inference image and atlases, with a 2-round loop profile (mask supervision in round 2):
    the loop's bookkeeping (sharing, control arms) must hold for the actual computations. -> profile, f0, x, atlases
    """
    import torch

    from isl_core.register import Atlases
    from isl_core.segment import build_network

    torch.manual_seed(0)
    p = loop_profile(rounds=2, steps=4, every=2, mask_from_round=2)
    p.segment.channels, p.segment.strides, p.segment.patch_size = (4, 8), (2,), size
    p.register.iterations, p.register.levels, p.register.warm_start_iterations = 3, 1, 2
    net0 = build_network(p.segment, num_classes)
    x = torch.rand(1, *size)
    atlases = Atlases(torch.rand(n_atlases, 1, *size), torch.randint(0, num_classes, (n_atlases, *size)))
    return p, net0, x, atlases
