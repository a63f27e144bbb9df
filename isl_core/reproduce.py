"""``isl reproduce``: execute the numbered notebooks headless with papermill, in order, into OUT/notebooks.

All notebooks share one working folder (``OUT/work``), so the baseline trained in 01 is reused by 02-07 and
the experiment computed once serves the ablation and results notebooks. A failing notebook stops the run
with its name, the cell and the error; the notebooks executed before it stay in place, and ``OUT/index.md``
records each one's status and run time, for people, and ``OUT/index.json`` the same as data (what ``make book``
reads). With ``jobs=2`` the notebooks that share no results (:data:`STAGES`) run two at a time: each keeps the
results it would get alone (the same computations in the same order inside each notebook), only sooner when
much of a notebook's time is spent outside torch (kernel start, imports, figures: the ``smoke`` profile).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from isl_core.runtime import write_json, write_text
from isl_core.viz.slices import STATIC_VIEWER_ENV

#: The numbered notebooks of a checkout (an editable install: ``pip install -e .`` or ``make setup``).
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def notebook_dir() -> Path:
    """Where the numbered notebooks are: ``$ISL_NOTEBOOKS`` if set, else the ``notebooks/`` of the checkout.

    The notebooks are course material that users open and edit, so they live in the repository, not inside the
    installed package; a non-editable install (``pip install isl-kit``) runs them from a clone's ``notebooks/``
    named by ``--notebooks DIR`` or ``$ISL_NOTEBOOKS``.
    """
    return Path(os.environ["ISL_NOTEBOOKS"]).expanduser() if os.environ.get("ISL_NOTEBOOKS") else NOTEBOOK_DIR


def notebooks(only: list[str] | None = None, folder: str | Path | None = None) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` of ``folder`` (default: :func:`notebook_dir`), or those in ``only``."""
    folder = Path(folder) if folder is not None else notebook_dir()
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"{folder}: no numbered notebooks (NN_*.ipynb) there; they ship with the isl-kit "
                                "repository, not the installed package: pass --notebooks DIR (a clone's notebooks/) "
                                "or set ISL_NOTEBOOKS")
    if only:
        unknown = sorted(set(only) - {p.name[:2] for p in found})
        if unknown:
            raise FileNotFoundError(f"{folder}: no notebook numbered {', '.join(unknown)}; there are "
                                    f"{', '.join(p.name[:2] for p in found)}")
        found = [p for p in found if p.name[:2] in only]
    return found


#: Which notebooks may run side by side. Within a stage the chains share no results: 01 trains the baseline that
#: 02-07 load (each would train its own without it), 04 runs the experiment that 05 and 06 read, and 00, 02, 03
#: and 07 write only their own files. A chain runs in order; a stage starts when the one before has finished.
#: Notebooks named in no stage run last, one at a time. The longer chain comes first, so that it starts first.
STAGES: tuple[tuple[tuple[str, ...], ...], ...] = ((("01",), ("00",)), (("04", "05", "06"), ("02", "03", "07")))


def schedule(todo: list[Path], jobs: int) -> list[list[list[Path]]]:
    """``todo`` as stages of chains: one chain of all in order when ``jobs`` is 1, else :data:`STAGES` (restricted to
    ``todo``, empty chains dropped) followed by one chain of the notebooks no stage names."""
    if jobs <= 1:
        return [[todo]]
    by_number = {p.name[:2]: p for p in todo}
    stages = [[[by_number[n] for n in chain if n in by_number] for chain in stage] for stage in STAGES]
    stages = [[chain for chain in stage if chain] for stage in stages]
    named = {n for stage in STAGES for chain in stage for n in chain}
    rest = [p for p in todo if p.name[:2] not in named]
    return [stage for stage in stages if stage] + ([[rest]] if rest else [])


#: Where the notebooks' cohort experiment writes its report, relative to OUT (notebooks 04-06: out_dir/experiment).
REPORT = Path("work", "experiment", "report.md")


#: The run record beside ``index.md``: ``{"profile", "notebooks": {NAME: {"status", "seconds", "path"}},
#: "total_seconds", "jobs", "wall_seconds"}``, notebooks in the order of their numbers.
RUN_RECORD = "index.json"


def _index(out: Path, rows: list[tuple[str, str, float, str]], profile: str, jobs: int = 1,
           wall: float | None = None) -> None:
    """Write ``index.json`` and ``index.md``; ``wall``: the run's wall time so far (default: the notebooks' sum,
    which it is when they run one at a time)."""
    wall = sum(r[2] for r in rows) if wall is None else wall
    write_json(out / RUN_RECORD, {"profile": profile, "total_seconds": sum(r[2] for r in rows), "jobs": jobs,
                                  "wall_seconds": wall, "notebooks": {
        name: {"status": status, "seconds": secs, "path": link} for name, status, secs, link in rows}})
    lines = [f"# Executed notebooks (profile `{profile}`)", "", "| notebook | status | seconds |", "|---|---|---|"]
    lines += [f"| [{name}]({link}) | {status} | {secs:.0f} |" for name, status, secs, link in rows]
    lines += ["", f"Total: {sum(r[2] for r in rows):.0f} s."]
    if jobs > 1:
        lines[-1] += (f" Wall time {wall:.0f} s: up to {jobs} notebooks ran at a time, so each one's seconds include "
                      "waiting for the CPU the other used.")
    if (out / REPORT).is_file():
        lines += ["", f"The cohort experiment's report (every method on every inference case): [{REPORT.as_posix()}]"
                      f"({REPORT.as_posix()})"]
    write_text(out / "index.md", "\n".join(lines) + "\n")


def _execute(pm, nb: Path, target: Path, params: dict, kernel_name: str) -> None:
    """One notebook through papermill; its kernel inherits this process's environment (see :func:`run_notebooks`)."""
    pm.execute_notebook(str(nb), str(target), parameters=params, kernel_name=kernel_name, cwd=str(nb.parent),
                        progress_bar=False)


def run_notebooks(out: str | Path = "outputs/reproduce", profile: str = "quick", data: str | Path | None = None,
                  device: str = "auto", seed: int = 0, only: list[str] | None = None,
                  kernel_name: str = "python3", notebook_folder: str | Path | None = None, jobs: int = 1) -> int:
    """Execute the notebooks; returns 0 when all ran, 1 when one failed.

    A failure stops its chain and every later stage; with ``jobs`` > 1 the chains running beside it finish first.
    """
    import papermill as pm

    from isl_core.data import load_dataset
    from isl_core.phantoms import cohort_for_profile, write_cohort

    out = Path(out).resolve()
    todo = notebooks(only, notebook_folder)
    if data is None:
        data = write_cohort(out / "data", cohort_for_profile(profile, seed))
    load_dataset(data)  # a bad dataset stops here, before any notebook runs
    params = {"profile": profile, "data_dir": str(Path(data).resolve()), "out_dir": str(out / "work"),
              "device": device, "seed": seed}
    order = {nb.name: i for i, nb in enumerate(todo)}
    rows: dict[str, tuple[str, str, float, str]] = {}
    lock = threading.Lock()
    t_start = time.perf_counter()

    def record(nb: Path, status: str, secs: float) -> None:
        with lock:
            rows[nb.name] = (nb.name, status, secs, f"notebooks/{nb.name}")
            _index(out, sorted(rows.values(), key=lambda r: order[r[0]]), profile, jobs,
                   time.perf_counter() - t_start)

    def run_chain(chain: list[Path]) -> bool:
        for nb in chain:
            target = out / "notebooks" / nb.name
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"[isl reproduce] {nb.name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                _execute(pm, nb, target, params, kernel_name)
            except pm.PapermillExecutionError as e:
                record(nb, f"failed (cell {e.exec_count}: {e.ename})", time.perf_counter() - t0)
                print(f"[isl reproduce] {nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                      f"  the executed notebook with the traceback: {target}", file=sys.stderr)
                return False
            secs = time.perf_counter() - t0
            record(nb, "ok", secs)
            print(f"[isl reproduce] {nb.name} ok ({secs:.0f} s)", flush=True)
        return True

    # Every kernel is told that it runs headless (the slice viewers draw static figures). Set once for the whole
    # run, not per notebook: kernels started from two threads read the same environment.
    before = os.environ.get(STATIC_VIEWER_ENV)
    os.environ[STATIC_VIEWER_ENV] = "1"
    try:
        for stage in schedule(todo, jobs):
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(stage)))) as pool:
                if not all(list(pool.map(run_chain, stage))):
                    return 1
    finally:
        if before is None:
            os.environ.pop(STATIC_VIEWER_ENV, None)
        else:
            os.environ[STATIC_VIEWER_ENV] = before
    print(f"[isl reproduce] index: {out / 'index.md'}")
    if (out / REPORT).is_file():
        print(f"[isl reproduce] report: {out / REPORT}")
    return 0
