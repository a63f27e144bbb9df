"""Random training patches whose random state fits in a checkpoint, so that a resumed training equals an
uninterrupted one bit for bit (Stage 1's sampler; ``segment`` saves and restores it with the process-wide
generators)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from isl_core.config import SegmentConfig

__all__ = ["PatchStream", "global_rng_state", "set_global_rng_state"]


def _train_transform(cfg: SegmentConfig):
    """Random patch sampling balanced on foreground plus light, laterality-preserving augmentation."""
    from monai import transforms as mt

    keys = ["image", "label"]
    steps = [mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=cfg.patch_size,
                                       pos=cfg.pos_neg_ratio, neg=1.0, num_samples=cfg.num_samples,
                                       allow_smaller=True),
             mt.SpatialPadd(keys=keys, spatial_size=cfg.patch_size)]
    # MONAI's transforms return MetaTensors; the network needs none of their metadata, so the batches are plain
    # tensors like everything else past the data boundary (EnsureTyped draws no random number: same patches)
    tail = [mt.EnsureTyped(keys=keys, track_meta=False)]
    if cfg.augment:
        # no flips: left and right organs (kidneys, adrenals) carry different labels
        steps += [
            mt.RandAffined(keys=keys, prob=0.3, rotate_range=(0.1, 0.1, 0.1), scale_range=(0.1, 0.1, 0.1),
                           mode=("bilinear", "nearest"), padding_mode="zeros"),
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            mt.RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
            mt.RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        ]
    return mt.Compose(steps + tail)


class PatchStream:
    """An endless stream of (images, labels) batches of random patches from preprocessed cases, whose position and
    random state fit in a checkpoint: a run resumed from one draws the same patches an uninterrupted run draws.

    The draws come from the DataLoader's shuffling generator and each random transform's own ``RandomState``
    (MONAI's ``set_random_state``). ``state()`` holds the generator as it was when the current pass over the cases
    began, how many batches of that pass were taken, and every transform's state now; ``restore`` replays the
    pass up to that batch (a few crops) and then puts the transforms' states back.
    """

    def __init__(self, cases: Sequence[dict[str, Any]], cfg: SegmentConfig, seed: int) -> None:
        from monai.data import DataLoader, Dataset

        plain = [{"image": c["image"], "label": c["label"]} for c in cases]
        self._transform = _train_transform(cfg)
        self._transform.set_random_state(seed=seed)
        self._gen = torch.Generator().manual_seed(seed)
        self._loader = DataLoader(Dataset(plain, transform=self._transform), batch_size=min(cfg.batch_size, len(plain)),
                                  shuffle=True, num_workers=0, generator=self._gen, drop_last=False)
        self._pass_start = self._gen.get_state()
        self._taken = 0
        self._it = iter(self._loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self._it)
        except StopIteration:
            self._pass_start, self._taken = self._gen.get_state(), 0
            self._it = iter(self._loader)
            batch = next(self._it)
        self._taken += 1
        return batch["image"], batch["label"]

    def _random_states(self) -> list:
        """Every ``RandomState`` the transforms draw from, in a fixed order (the nested ones included)."""
        import numpy as np

        found, seen, todo = [], set(), [self._transform]
        while todo:
            obj = todo.pop(0)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for value in vars(obj).values():
                if isinstance(value, np.random.RandomState):
                    found.append(value)
                elif isinstance(value, (list, tuple)):
                    todo += [v for v in value if hasattr(v, "__dict__") and type(v).__module__.startswith("monai")]
                elif hasattr(value, "__dict__") and type(value).__module__.startswith("monai"):
                    todo.append(value)
        return found

    def state(self) -> dict[str, Any]:
        """Tensors and plain numbers only (a checkpoint loads with ``weights_only=True``)."""
        states = [r.get_state() for r in self._random_states()]
        return {"generator": self._pass_start.clone(), "taken": self._taken,
                "transforms": [{"keys": torch.from_numpy(k.astype("int64")), "pos": int(p), "has_gauss": int(g),
                                "cached": float(c)} for _, k, p, g, c in states]}

    def restore(self, state: dict[str, Any]) -> None:
        import numpy as np

        self._gen.set_state(state["generator"])
        self._pass_start, self._taken = self._gen.get_state(), 0
        self._it = iter(self._loader)
        for _ in range(int(state["taken"])):
            next(self)
        randoms = self._random_states()
        if len(randoms) != len(state["transforms"]):
            raise ValueError("the checkpoint's patch sampler has another set of random transforms")
        for r, s in zip(randoms, state["transforms"], strict=True):
            r.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def global_rng_state() -> dict[str, Any]:
    """The process-wide generators (torch, numpy, python), which dropout or a transform without its own state
    could draw from; saved so that nothing random differs after a resume."""
    import random

    import numpy as np

    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                                                       "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss if gauss is None else float(gauss)},
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def set_global_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
