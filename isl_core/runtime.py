"""Run-time plumbing shared by every stage: device choice, seeding, errors for the user, safe file I/O.

File writing lives here (``atomic_path``, ``write_json``, ``write_text``, ``write_csv``, ``read_json``) so that every
file the kit writes is complete or absent, and every file it reads that turns out broken stops the run with one
message naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from isl_core import outputs

if TYPE_CHECKING:
    import pandas as pd


class UserError(Exception):
    """A problem the user can fix (bad input, an option out of range, an output folder that belongs to another run).

    The ``isl`` command prints the message as one line ``isl: error: ...`` and exits with status 2; the message
    names the file or option and says what to do.
    """


class DatasetError(UserError, ValueError):
    """A dataset folder or a file the kit reads breaks the contract; the message names the file and the fix."""


class DeviceError(UserError, RuntimeError):
    """The requested device is not available on this machine."""


_TRUE_WORDS, _FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """The environment variable ``name`` read as a switch: 1/0, true/false, yes/no, on/off in any case (unset or
    empty: ``default``); any other word raises ``UserError`` rather than guessing what was meant."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in _TRUE_WORDS:
        return True
    if raw.lower() in _FALSE_WORDS:
        return False
    raise UserError(f"environment variable {name}={raw!r}: not a switch; set it to one of "
                    f"{'/'.join(_TRUE_WORDS)} or {'/'.join(_FALSE_WORDS)} (any case), or unset it")


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
        raise DeviceError(f"--device {device} was requested but no CUDA GPU is visible; use --device auto or cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise DeviceError("--device mps was requested but no Apple GPU is visible; use --device auto or cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device!r}: not a device name; use auto, cpu, cuda or cuda:N") from None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or ``taskset``'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads once for the process and return the count in use.

    torch's default is the machine's physical core count, which overcommits a process confined to fewer cores
    (a container's CPU share, ``taskset``, a Dask worker's slice): threads then wait on each other at every
    operator. The default here is :func:`usable_cores`; an ``OMP_NUM_THREADS`` the user set wins over both.
    """
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            return torch.get_num_threads()
        threads = usable_cores()
    if threads != torch.get_num_threads():
        torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch through MONAI (deterministic algorithms stay off: they are slow)."""
    from monai.utils import set_determinism

    # None leaves torch's setting alone (off unless the caller turned it on). Passing False imports torch's
    # compiler stack (about 2 s), which only processes that build no optimiser (predict, evaluate) are spared.
    set_determinism(seed=seed, use_deterministic_algorithms=None)


def _umask() -> int:
    # os.umask is the only portable way to read the mask: set it and put it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` only if the block succeeds.

    A crash mid-write therefore never leaves a truncated result behind. Inside a claimed output folder
    (``outputs.claim``) an existing ``path`` is replaced only if it is the kit's, and the new file is recorded in the
    folder's manifest. The file gets the permissions an ordinary
    ``open()`` would give it (0666 minus the umask): ``mkstemp`` creates it private (0600), which would hide
    results from the other members of a shared project folder.
    """
    path = Path(path)
    outputs.check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=outputs.temporary_prefix(path),
                               suffix=suffix or "".join(path.suffixes))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
        outputs.record(path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON file ``path``; a missing, unreadable or truncated file raises ``DatasetError`` naming it.

    ``what`` says what the file is for the message, e.g. ``"run configuration"`` or ``"case result"``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: {what} is not UTF-8 text; restore or regenerate the file") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: {what} is not valid JSON ({e.msg}, line {e.lineno}); the file is damaged or "
                           "truncated: restore it, or remove it so the kit regenerates it") from None


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` (no index) atomically: temporary file in the same folder, then ``os.replace``.

    Undefined values are written as ``NaN`` (not an empty cell), so a reader sees "undefined" rather than
    "missing", and ``pd.read_csv`` reads them back as NaN.
    """
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, na_rep="NaN")


def json_safe(obj: Any) -> Any:
    """Replace NaN / inf floats by ``None`` (recursively), because ``json.dumps`` would write the non-standard
    tokens ``NaN`` / ``Infinity`` that strict JSON readers (browsers, ``jq``) reject."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


#: Settings whose values are content hashes: a difference in them is said in words rather than as two hashes.
_HASHED = {"dataset": "its dataset.json or image/label files changed",
           "dataset_fingerprint": "its dataset.json or image/label files changed", "model": "other weights"}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings two JSON documents (an experiment's stamps, a run folder's configuration) disagree on, one
    phrase each: ``profile.refine.beta (0.6 -> 0.5)``, ``dataset (its dataset.json or image/label files changed)``.

    Hashed settings come first and say what they mean; the profile's name is left out when fields of the profile
    differ (the fields say more). The one settings comparison of the kit, so every refusal names changes alike.
    """
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b), key=lambda k: (k not in _HASHED, k)):
        if a.get(key) == b.get(key):
            continue
        diffs.append(f"{key} ({_HASHED[key]})" if key in _HASHED else f"{key} ({a.get(key)!r} -> {b.get(key)!r})")
    named = [d for d in diffs if not d.startswith("profile.name ")]
    return named if any(d.startswith("profile.") for d in named) else diffs
