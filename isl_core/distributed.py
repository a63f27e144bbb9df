"""The experiment on a Dask cluster: a local one (``workers=N``) or a running one (``scheduler=ADDRESS``).

Each fold's baseline is one task and each (fold, case) with all its methods is one task that depends on its
fold's baseline (``isl_core.casework``); every task reads and writes the experiment's output folder, which must
therefore be storage that the driver and every worker share (one machine: any folder; several nodes: a shared
file system). Faults: a task that raises is retried ``retries`` times; a task whose worker dies is rescheduled on
another worker, at most ``retries`` times as well (Dask's ``allowed-failures``); after that the case is reported
as failed with its error and the others still finish. Rerunning the same command skips every finished case.

A local cluster on a GPU machine gets one worker per visible GPU (``workers`` of them at most), each pinned to its
own GPU through ``CUDA_VISIBLE_DEVICES``; on a CPU machine the cores are split between the workers
(``max(1, cores // workers)`` torch threads each). Each worker runs one case at a time (one Dask thread): a case
is itself multi-threaded in torch, and two at once on the same cores would only fight over them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isl_core import outputs
from isl_core.casework import BaselineJob, CaseJob, baseline_run, case_done, run_case
from isl_core.runtime import UserError, usable_cores

if TYPE_CHECKING:
    from distributed import Client


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise UserError("--workers / --scheduler need Dask: pip install 'dask[distributed]'") from None
    return distributed


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def local_layout(workers: int, device: str = "auto") -> tuple[int, list[str], int]:
    """(worker processes, the GPU each is pinned to (empty on a CPU machine), torch threads per worker)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",")] if visible else [
            str(i) for i in range(torch.cuda.device_count())]
        n = min(workers, len(gpus))
        return n, gpus[:n], max(1, usable_cores() // n)
    return workers, [], max(1, usable_cores() // workers)


class PinWorker:
    """Worker plugin: pins each local worker to its own GPU (by worker name) and sets its torch threads."""

    name = "isl-pin-worker"

    def __init__(self, gpus: list[str], threads: int):
        self.gpus, self.threads = gpus, threads

    def setup(self, worker) -> None:
        import torch

        if self.gpus:  # before the first CUDA call of this process, so torch sees only this GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[int(worker.name) % len(self.gpus)]
        torch.set_num_threads(self.threads)


@contextlib.contextmanager
def open_client(workers: int | None, scheduler: str | None, device: str = "auto", retries: int = 2
                ) -> Iterator[tuple[Client, int | None]]:
    """A Dask client on a running ``scheduler``, or on a new local cluster of ``workers`` processes; yields (client,
    torch threads per task)."""
    distributed = _import_distributed()
    import dask

    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except OSError as e:
            raise UserError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({e}); start one "
                            "with `dask scheduler` or check the address") from None
        with client:
            yield client, None
        return
    n, gpus, threads = local_layout(int(workers), device)
    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           env={"OMP_NUM_THREADS": str(threads)}, silence_logs=40)
    with cluster, distributed.Client(cluster) as client:
        client.register_plugin(_plugin(distributed, gpus, threads))
        yield client, threads


def _plugin(distributed, gpus: list[str], threads: int):
    # subclassed here so that importing this module does not import Dask
    cls = type("IslPinWorker", (PinWorker, distributed.WorkerPlugin), {})
    return cls(gpus, threads)


def _submit(client: Client, units: list[tuple[BaselineJob, list[CaseJob]]], out: Path, force: bool, retries: int,
            threads: int | None) -> tuple[dict[Any, str], int]:
    futures, skipped = {}, 0
    run = uuid.uuid4().hex[:8]  # keys unique per run: a rerun on the same scheduler never reuses a stale result
    for base, cases in units:
        todo = [j for j in cases if force or not case_done(out, j.case_id, j.methods, j.stamp_id)]
        skipped += len(cases) - len(todo)
        if not todo:
            continue
        fold = "split" if base.fold is None else base.fold
        base.progress = False  # one bar, the driver's: the workers' bars would interleave in the log
        baseline = client.submit(baseline_run, base, key=f"baseline-{fold}-{run}", pure=False, retries=retries)
        for job in todo:
            if force:  # recompute: the finished mark goes first, so an interrupted rerun redoes the case
                outputs.remove(out / "cases" / f"{job.case_id}.json")
            job.threads = threads
            f = client.submit(run_case, job, baseline, key=f"case-{job.case_id}-{run}", pure=False, retries=retries)
            futures[f] = job.case_id
    return futures, skipped


def run_on_cluster(units: list[tuple[BaselineJob, list[CaseJob]]], out: Path, *, workers: int | None = None,
                   scheduler: str | None = None, device: str = "auto", retries: int = 2, force: bool = False,
                   progress: bool = True, on_case: Callable[[dict[str, Any]], None] | None = None) -> dict[str, str]:
    """Run every unfinished case (every selected one with ``force``) as a Dask task on a running ``scheduler`` or a
    local cluster of ``workers`` processes; returns {case: error} for the cases that failed."""
    from tqdm.auto import tqdm

    distributed = _import_distributed()
    failed: dict[str, str] = {}
    with open_client(workers, scheduler, device, retries) as (client, threads):
        if progress:
            print(f"Dask dashboard: {client.dashboard_link}" if _has_bokeh() else
                  "Dask dashboard: off (pip install 'bokeh>=3.1' to watch the tasks in a browser)")
        futures, skipped = _submit(client, units, out, force, retries, threads)
        with tqdm(total=len(futures) + skipped, initial=skipped, desc="inference cases", disable=not progress) as bar:
            for future in distributed.as_completed(list(futures)):
                case = futures[future]
                try:
                    record = future.result()
                except Exception as e:  # reported, not raised: the other cases still finish
                    failed[case] = f"{type(e).__name__}: {e}"
                    bar.write(f"case {case} failed: {failed[case]}")
                else:
                    if on_case is not None:
                        on_case(record)
                bar.update(1)
    return failed
