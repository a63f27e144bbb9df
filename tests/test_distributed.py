"""The experiment on a Dask cluster (loopback only): same Dice as in-process, and a killed worker loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pandas as pd
import pytest
import torch
from helpers import TINY_METHODS, tiny_cohort, tiny_profile

from isl_core.experiment import ExperimentSettings, run_experiment
from isl_core.outputs import record_tree

distributed = pytest.importorskip("distributed")

KEYS = ["case", "method", "organ"]


def _settings(**kw) -> ExperimentSettings:
    return ExperimentSettings(profile=tiny_profile(), methods=TINY_METHODS, device="cpu", folds=2, progress=False,
                              **kw)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The reference: the cross-validated run in this process, one torch thread (as each local worker gets)."""
    root = tmp_path_factory.mktemp("dask")
    cohort = tiny_cohort(root / "cohort")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(cohort, root / "in_process", _settings())
    finally:
        torch.set_num_threads(threads)
    return cohort, root


@pytest.mark.slow
def test_two_local_workers_give_the_in_process_dice(in_process):
    cohort, root = in_process
    summary = run_experiment(cohort, root / "two_workers", _settings(workers=2))
    assert "failed_cases" not in summary
    ref = pd.read_csv(root / "in_process" / "per_case.csv").set_index(KEYS).sort_index()
    got = pd.read_csv(root / "two_workers" / "per_case.csv").set_index(KEYS).sort_index()
    assert got.index.equals(ref.index) and len(ref) == 6 * len(TINY_METHODS) * 13
    # bit-identical: the same seeds per case, one torch thread per process on both sides, CPU kernels that are
    # deterministic at a fixed thread count
    assert (got["dice"].fillna(-1) == ref["dice"].fillna(-1)).all()
    assert (got["fold"] == ref["fold"]).all()
    assert got["worker"].str.startswith("tcp://").all()
    assert ref["worker"].str.startswith("local:").all()


@pytest.mark.slow
def test_a_worker_killed_mid_case_loses_nothing(in_process):
    cohort, root = in_process
    out = root / "killed"
    for fold in (0, 1):  # the folds' baselines are done: this test is about the cases
        shutil.copytree(root / "in_process" / "folds" / str(fold), out / "folds" / str(fold))
    record_tree(out)  # copies of the kit's own files: listed in the folder's manifest as the kit had written them
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(summary=run_experiment(
            cohort, out, _settings(scheduler=cluster.scheduler_address))))
        runner.start()
        killed = None
        deadline = time.time() + 120
        while killed is None and time.time() < deadline and runner.is_alive():
            for address, keys in client.processing().items():
                cases = [k for k in keys if str(k).startswith("case-")]
                if cases:
                    pid = client.run(os.getpid, workers=[address])[address]
                    os.kill(pid, signal.SIGKILL)  # the worker dies mid-case
                    killed = (address, str(cases[0]))
                    break
            time.sleep(0.05)
        runner.join(timeout=300)
    assert killed is not None, "no case was seen running"
    summary = result["summary"]
    assert "failed_cases" not in summary and summary["protocol"]["n_cases"] == 6
    records = [json.loads(p.read_text()) for p in (out / "cases").glob("*.json")]
    assert sorted(r["case"] for r in records) == sorted(set(r["case"] for r in records)) and len(records) == 6
    killed_case = next(r for r in records if killed[1].startswith(f"case-{r['case']}-"))
    assert killed_case["worker"] != killed[0]  # finished by another (or a restarted) worker process
    per_case = pd.read_csv(out / "per_case.csv")
    assert per_case.groupby(["case", "method", "organ"]).size().eq(1).all() and per_case["case"].nunique() == 6
    ref = pd.read_csv(root / "in_process" / "per_case.csv").set_index(KEYS).sort_index()
    assert (per_case.set_index(KEYS).sort_index()["dice"].fillna(-1) == ref["dice"].fillna(-1)).all()
