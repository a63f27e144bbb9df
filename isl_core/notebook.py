"""The numbered notebooks' common set-up: one call instead of the same cells in every notebook.

    setup = notebook.setup(profile, data_dir, out_dir, device, seed)
    net = setup.baseline()                   # f0: loaded from out_dir/baseline, trained there when missing
    summary, per_case = setup.experiment()   # notebooks 04-06: every method on every inference case, computed once
    per_case, where = setup.arms_cases()     # notebook 07: the control arms beside ISL on the same cases

Empty parameters are resolved the same way in every notebook (:func:`resolve`): ``profile`` from
``$ISL_PROFILE``, else ``"quick"`` (the teaching profile a student sees when opening a notebook; tests and CI pass
``smoke`` through papermill or the variable); ``out_dir`` from ``$ISL_OUT_DIR``, else
``<repository>/outputs/notebooks-<profile>``; ``data_dir`` from ``$ISL_DATA_DIR``, else ``out_dir/data`` (the
synthetic cohort of the profile, written there the first time). All notebooks share ``out_dir``: the baseline of
notebook 01 and the experiment of 04-06 are computed once and reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from isl_core import config
from isl_core.config import Profile, get_profile
from isl_core.data import Dataset, load_case, load_cases, load_dataset
from isl_core.evaluate import case_means, mean_dice, organ_metrics
from isl_core.folds import baseline_dir
from isl_core.register import Atlases
from isl_core.runtime import resolve_device

__all__ = ["ARMS_RUN", "COURSE_METHODS", "DEFAULT_PROFILE", "TTA_ARMS", "Setup", "case_table", "method_table",
           "organ_means", "print_config", "resolve", "setup"]

#: What a notebook runs when no profile is given: the profile whose numbers show the effects the text describes.
DEFAULT_PROFILE = "quick"
#: The top of a checkout (where ``outputs/`` goes); ``None`` in an installed copy without the repository around it.
_CHECKOUT = Path(__file__).resolve().parents[1]
REPO: Path | None = _CHECKOUT if (_CHECKOUT / "notebooks").is_dir() else None
#: The shared experiment's methods: all but the control arms, which would about double its time (notebook 07 reads
#: them from ARMS_RUN, or runs the ones it needs on request: :meth:`Setup.arms_cases`).
COURSE_METHODS: tuple[str, ...] = tuple(m for m in config.METHODS if m not in config.CONTROL_ARMS)
#: The control arms notebook 07 sets beside ISL: test-time adaptation on x* alone, and the atlases unregistered.
TTA_ARMS: tuple[str, ...] = ("tent", "pseudo-label", "finetune-atlases")
#: The cross-validated phantom run with every control arm (docs/claims.md), which notebook 07 reads by default.
ARMS_RUN: Path | None = REPO / "docs" / "claims_runs" / "per_case_phantom_arms.csv" if REPO else None


def resolve(profile: str = "", data_dir: str | Path = "", out_dir: str | Path = "") -> tuple[str, Path, Path]:
    """The profile name, dataset folder and results folder a notebook uses (see the module docstring)."""
    name = profile or os.environ.get("ISL_PROFILE") or DEFAULT_PROFILE
    if name not in config.PROFILE_NAMES:
        raise ValueError(f"profile {name!r} (from the parameters cell or $ISL_PROFILE) is unknown; "
                         f"choose one of {', '.join(config.PROFILE_NAMES)}")
    # an installed copy (e.g. pip on Colab) has no checkout: results go under the working directory instead
    top = REPO if REPO is not None else Path.cwd()
    out = Path(out_dir or os.environ.get("ISL_OUT_DIR") or top / "outputs" / f"notebooks-{name}")
    data = Path(data_dir or os.environ.get("ISL_DATA_DIR") or out / "data")
    return name, data.expanduser().resolve(), out.expanduser().resolve()


@dataclass
class Setup:
    """What every notebook starts from: the settings, the checked dataset and the shared folders."""

    profile: Profile
    ds: Dataset
    data_dir: Path
    out_dir: Path
    device: torch.device
    seed: int = 0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def baseline_dir(self) -> Path:
        """The single split's baseline folder of ``out_dir`` (``folds.baseline_dir``), shared by every notebook."""
        return baseline_dir(self.out_dir)

    @property
    def experiment_dir(self) -> Path:
        return self.out_dir / "experiment"

    def train_cases(self) -> list[dict[str, Any]]:
        """The training cases on the working grid (loaded once per notebook)."""
        if "train" not in self._cache:
            self._cache["train"] = load_cases(self.ds.training, self.profile.data, self.ds.modality)
        return self._cache["train"]

    def atlases(self) -> Atlases:
        """The training cases as atlases for registration (one object, so its organ-map cache is shared)."""
        if "atlases" not in self._cache:
            self._cache["atlases"] = Atlases.from_cases(self.train_cases(), self.profile.data.spacing)
        return self._cache["atlases"]

    def case(self, case_id: str = "") -> dict[str, Any]:
        """One inference case on the working grid: ``case_id``, or the first validation case when empty."""
        case = self.ds.case(case_id) if case_id else self.ds.validation[0]
        return load_case(case, self.profile.data, self.ds.modality)

    def baseline(self) -> nn.Module:
        """f0: loaded from ``out_dir/baseline`` when notebook 01 (or an earlier run) trained it, else trained there.

        Trained by the kit's one baseline trainer (``segment.train_baseline``), as ``isl train`` and ``isl
        experiment`` train theirs, so the baseline is the same whichever notebook trains it first.
        """
        from isl_core.segment import MODEL, load_segmenter, train_baseline

        if (self.baseline_dir / MODEL).is_file():
            return load_segmenter(self.baseline_dir, self.device)[0]
        net, state = train_baseline(self.ds, self.ds.training, self.profile, self.baseline_dir, seed=self.seed,
                                    device=self.device, progress=False)
        print(f"trained the baseline: {state.step} steps in {state.seconds:.0f} s -> {self.baseline_dir}")
        return net

    def experiment(self, methods: tuple[str, ...] = COURSE_METHODS) -> tuple[dict[str, Any], pd.DataFrame]:
        """The experiment notebooks 04-06 share: ``methods`` on every inference case, into ``out_dir/experiment``.

        Returns ``summary.json`` as a dict and ``per_case.csv`` (case x method x organ). The experiment resumes, so
        whichever of the three notebooks runs first computes it and the others read it; its baseline is the one of
        :meth:`baseline` (``out_dir/baseline``), never a second one.
        """
        from isl_core.experiment import ExperimentSettings, run_experiment

        self.baseline()  # make sure out_dir/baseline holds f0 before the experiment points at it
        settings = ExperimentSettings(profile=self.profile, methods=tuple(methods), model=str(self.baseline_dir),
                                      seed=self.seed, device=str(self.device), progress=False)
        summary = run_experiment(self.data_dir, self.experiment_dir, settings)
        per_case = pd.read_csv(self.experiment_dir / "per_case.csv")
        print(f"experiment {self.experiment_dir}: {per_case['case'].nunique()} inference cases x "
              f"{len(methods)} methods")
        return summary, per_case

    def arms_cases(self, here: bool = False) -> tuple[pd.DataFrame, str]:
        """ISL, MALF, the baseline and :data:`TTA_ARMS` on the same cases: a per-case table (``case, method, organ,
        dice, seconds``, and ``seed`` when there are several) and a sentence saying which cases these are.

        ``here``: the arms run on this run's inference cases, with the same f0 and seeds as the shared experiment,
        into ``out_dir/experiment_arms`` (resumable; about as long again as the shared experiment), and join its
        rows. Otherwise the committed cross-validated run :data:`ARMS_RUN` (another cohort: docs/claims.md).
        """
        if not here and ARMS_RUN is not None and ARMS_RUN.is_file():
            return pd.read_csv(ARMS_RUN), ("the cross-validated phantom run of docs/claims.md (24 cases, 4 folds, "
                                           "each with its own f0; another cohort than this notebook's)")
        if not here:  # an installed kit without the repository around it (Colab): the run is not there
            print("the committed run with the control arms ships with a clone of the repository, not with the "
                  "installed package: running the arms on this run's inference cases instead")
        from isl_core.experiment import ExperimentSettings, run_experiment

        _, shared = self.experiment()
        settings = ExperimentSettings(profile=self.profile, methods=("baseline", *TTA_ARMS),
                                      model=str(self.baseline_dir), seed=self.seed, device=str(self.device),
                                      progress=False)
        run_experiment(self.data_dir, self.out_dir / "experiment_arms", settings)
        arms = pd.read_csv(self.out_dir / "experiment_arms" / "per_case.csv")
        both = pd.concat([shared, arms[arms["method"] != "baseline"]], ignore_index=True)
        return both, f"this run's {shared['case'].nunique()} inference cases (the shared experiment's f0)"

    def dice(self, pred: Any, truth: Any) -> float:
        """Organ-averaged Dice of two label maps on the working grid (the empty-organ rules of ``evaluate``)."""
        return mean_dice(organ_metrics(pred, truth, self.ds.labels, self.profile.data.spacing, hd95=False))


def case_table(per_case: pd.DataFrame, methods: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Organ-averaged Dice per case (rows) and method (columns), from a long ``per_case`` table."""
    return case_means(per_case).pivot(index="case", columns="method", values="dice")[list(methods)]


def method_table(per_case: pd.DataFrame, methods: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """One row per method: mean organ-averaged Dice over cases, its paired difference from the baseline with the
    Wilcoxon p-value, and the mean seconds per case (what the method costs alone)."""
    from isl_core.evaluate import paired_tests

    dice = case_table(per_case, methods).mean()
    rows = []
    for m in methods:
        test = paired_tests(per_case, m, "baseline") if m != "baseline" else {}
        rows.append({"method": m, "mean_dice": dice[m], "delta_vs_baseline": test.get("delta_mean_dice"),
                     "p_wilcoxon": test.get("p_value"),
                     "seconds_per_case": per_case.loc[per_case["method"] == m, "seconds"].mean()})
    return pd.DataFrame(rows).set_index("method")


def organ_means(per_case: pd.DataFrame, methods: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Organs (rows, in label order) x methods: mean Dice over the cases where the organ is defined (each case first
    averaged over its seeds, as the claims do)."""
    rows = per_case[per_case["method"].isin(methods)]
    by_case = rows.groupby(["method", "organ", "case"], sort=False)["dice"].mean()
    table = by_case.groupby(level=[0, 1], sort=False).mean().unstack(0)
    return table.reindex(index=list(pd.unique(per_case["organ"])), columns=list(methods))


def setup(profile: str = "", data_dir: str | Path = "", out_dir: str | Path = "", device: str = "auto",
          seed: int = 0) -> Setup:
    """Resolve the parameters, write the synthetic cohort of the profile if no dataset is there, check the dataset.

    Prints the dataset, results and device lines every notebook shows. A bad dataset stops here with the message of
    :func:`isl_core.data.load_dataset`, before any work starts.
    """
    from isl_core.phantoms import cohort_for_profile, write_cohort

    name, data, out = resolve(profile, data_dir, out_dir)
    prof = get_profile(name)
    if not (data / "dataset.json").is_file():
        print(f"writing the synthetic {name!r} cohort into {data}")
        write_cohort(data, cohort_for_profile(name, seed))
    ds = load_dataset(data)
    dev = resolve_device(device)
    print(f"profile  {name}")
    print(f"dataset  {data}\n         {len(ds.training)} training, {len(ds.validation)} validation, "
          f"{len(ds.test)} test cases; {len(ds.organs)} organs")
    print(f"results  {out}")
    print(f"device   {dev}")
    return Setup(prof, ds, data, out, dev, seed)


def print_config() -> None:
    """MONAI's record of the software versions (MONAI, PyTorch, NumPy, ...), so a result can be traced to them.

    Also silences two harmless warnings from inside MONAI (a deprecated tensor indexing, a changed default of a
    transform argument the kit does not use) that would otherwise repeat in many cells.
    """
    import warnings

    from monai.config import print_config as monai_print_config

    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    warnings.filterwarnings("ignore", message=".*Current default value of argument", category=FutureWarning)
    monai_print_config()
