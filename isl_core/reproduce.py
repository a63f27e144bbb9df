"""``isl reproduce``: execute the numbered notebooks headless with papermill, in order, into OUT/notebooks.

All notebooks share one working folder (``OUT/work``), so the baseline trained in 01 is reused by 02-06 and
the experiment computed once serves the ablation and results notebooks. A failing notebook stops the run
with its name, the cell and the error; the notebooks executed before it stay in place, and ``OUT/index.md``
records each one's status and run time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from isl_core.runtime import write_text

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"{NOTEBOOK_DIR}: no numbered notebooks; run from a checkout of isl-kit")
    if only:
        found = [p for p in found if p.name[:2] in only]
        if not found:
            raise FileNotFoundError(f"{NOTEBOOK_DIR}: no notebook numbered {', '.join(only)}")
    return found


#: Where the notebooks' cohort experiment writes its report, relative to OUT (notebooks 04-06: out_dir/experiment).
REPORT = Path("work", "experiment", "report.md")


def _index(out: Path, rows: list[tuple[str, str, float, str]], profile: str) -> None:
    lines = [f"# Executed notebooks (profile `{profile}`)", "", "| notebook | status | seconds |", "|---|---|---|"]
    lines += [f"| [{name}]({link}) | {status} | {secs:.0f} |" for name, status, secs, link in rows]
    lines += ["", f"Total: {sum(r[2] for r in rows):.0f} s."]
    if (out / REPORT).is_file():
        lines += ["", f"The cohort experiment's report (every method on every inference case): [{REPORT.as_posix()}]"
                      f"({REPORT.as_posix()})"]
    write_text(out / "index.md", "\n".join(lines) + "\n")


def run_notebooks(out: str | Path = "outputs/reproduce", profile: str = "quick", data: str | Path | None = None,
                  device: str = "auto", seed: int = 0, only: list[str] | None = None,
                  kernel_name: str = "python3") -> int:
    """Execute the notebooks; returns 0 when all ran, 1 when one failed (the run stops there)."""
    import papermill as pm

    from isl_core.data import load_dataset
    from isl_core.phantoms import cohort_for_profile, write_cohort

    out = Path(out).resolve()
    todo = notebooks(only)
    if data is None:
        data = write_cohort(out / "data", cohort_for_profile(profile, seed))
    load_dataset(data)  # a bad dataset stops here, before any notebook runs
    params = {"profile": profile, "data_dir": str(Path(data).resolve()), "out_dir": str(out / "work"),
              "device": device, "seed": seed}
    rows: list[tuple[str, str, float, str]] = []
    for nb in todo:
        target = out / "notebooks" / nb.name
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"[isl reproduce] {nb.name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(target), parameters=params, kernel_name=kernel_name,
                                cwd=str(NOTEBOOK_DIR), progress_bar=False)
        except pm.PapermillExecutionError as e:
            rows.append((nb.name, f"failed (cell {e.exec_count}: {e.ename})", time.perf_counter() - t0,
                         f"notebooks/{nb.name}"))
            _index(out, rows, profile)
            print(f"[isl reproduce] {nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                  f"  the executed notebook with the traceback: {target}", file=sys.stderr)
            return 1
        secs = time.perf_counter() - t0
        rows.append((nb.name, "ok", secs, f"notebooks/{nb.name}"))
        _index(out, rows, profile)
        print(f"[isl reproduce] {nb.name} ok ({secs:.0f} s)", flush=True)
    print(f"[isl reproduce] index: {out / 'index.md'}")
    if (out / REPORT).is_file():
        print(f"[isl reproduce] report: {out / REPORT}")
    return 0
