"""The benchmark scripts still fit the kit: what they time and patch exists under the names they use.

The benchmarks are run by hand, on idle machines, long after the code they time was last changed; a renamed
function then breaks them only at the end of a setup. These checks are cheap: they load each script's module
(nothing runs) and resolve every kit name it wraps.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

from isl_core import segment
from isl_core.config import get_profile

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str) -> dict:
    """The module namespace of ``bench/NAME`` (its ``main`` is not run)."""
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling registration.py
    try:
        return runpy.run_path(str(BENCH / name))
    finally:
        sys.path.remove(str(BENCH))


def test_every_function_the_profile_times_exists():
    for owner, name, label in _script("profile_quick.py")["HOT"]:
        module = sys.modules[owner] if isinstance(owner, str) else owner
        assert callable(getattr(module, name, None)), f"{label}: {owner}.{name} is gone"
    register = sys.modules["isl_core.register"]
    assert callable(register.optimise)  # the per-level timer wraps it


def test_the_unet_benchmark_measures_both_precisions_and_restores_the_kit():
    native = segment.has_native_bf16
    batch = (torch.randn(1, 1, 16, 16, 16), torch.randint(0, 14, (1, 1, 16, 16, 16)))
    r = _script("unet_step.py")["precision_ratio"](get_profile("ci"), batch, pairs=1)
    assert r["fp32_ms"] > 0 and r["bf16_ms"] > 0 and r["median_ratio"] > 0
    assert segment.has_native_bf16 is native and r["cpu_has_native_bf16"] == native("cpu")
