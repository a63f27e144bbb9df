"""Run-time plumbing shared by every stage: device choice, seeding, atomic file writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch through MONAI (deterministic algorithms stay off: they are slow)."""
    from monai.utils import set_determinism

    # None leaves torch's setting alone (off unless the caller turned it on). Passing False imports torch's
    # compiler stack (about 2 s), which only processes that build no optimiser (predict, evaluate) are spared.
    set_determinism(seed=seed, use_deterministic_algorithms=None)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` only if the block succeeds.

    A crash mid-write therefore never leaves a truncated result behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or "".join(path.suffixes))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
