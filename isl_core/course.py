"""Course material from the numbered notebooks: student copies, the book (Jupyter Book 1), the pipeline diagram.

* ``write_student_copies(out)``: every numbered notebook with each cell tagged ``solution`` replaced by a stub
  (a markdown hint and a ``# Your solution here`` code cell) and all outputs stripped.
* ``build_book(run, out)``: a static HTML site at ``OUT/html/index.html`` from notebooks *already executed* by
  ``isl reproduce --out RUN`` (the book builder executes nothing: ``execute_notebooks: "off"``), with the
  README's figures, the glossary (``docs/glossary.md`` when present), the pipeline diagram drawn by
  ``viz.pipeline_figure``, the citation and each notebook's run time from ``RUN/index.json``. The pages show the
  learner's notebook: papermill's injected-parameters cell and stderr are left out, and the build machine's
  absolute paths are shortened (``out_dir``, ``.``, ``~``).

Command line (what ``make student`` and ``make book`` call)::

    python -m isl_core.course student --out outputs/student
    python -m isl_core.course book --run outputs/book/run --out outputs/book

Everything written here is a build product inside its own folder; a folder that is not one (no marker file
from an earlier build) is never replaced.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from isl_core.reproduce import NOTEBOOK_DIR, RUN_RECORD, notebooks
from isl_core.runtime import read_json, write_text

REPO = NOTEBOOK_DIR.parent
BOOK_SOURCES = REPO / "book"
SOLUTION_TAG = "solution"
STUB_CODE = "# Your solution here\n"
STUB_HINT = "**Your turn:** write your solution in the code cell below."
MARKER = ".isl-course-build"  # marks a folder this module wrote and may replace


# ------------------------------------------------------------------------------------------ student copies


def _is_solution(cell) -> bool:
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def student_notebook(nb):
    """A copy of ``nb`` (an nbformat notebook) with every run of ``solution`` cells replaced by one stub pair
    (hint + empty code cell) and all outputs and execution counts stripped."""
    import copy

    import nbformat

    out = copy.deepcopy(nb)
    out.nbformat_minor = max(out.nbformat_minor, 5)  # cell ids (4.5+): the stubs get fresh ones
    cells, previous_was_solution = [], False
    for cell in out.cells:
        if _is_solution(cell):
            if not previous_was_solution:  # consecutive solution cells (code + explanation) become one stub
                cells += [nbformat.v4.new_markdown_cell(STUB_HINT), nbformat.v4.new_code_cell(STUB_CODE)]
            previous_was_solution = True
            continue
        previous_was_solution = False
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.setdefault("id", nbformat.v4.new_raw_cell().id)  # a notebook older than 4.5 has none
        cells.append(cell)
    out.cells = cells
    nbformat.validate(out)
    return out


def write_student_copies(out: str | Path = "outputs/student", sources: Sequence[Path] | None = None) -> list[Path]:
    """Write the student copy of each notebook (default: the numbered notebooks) into ``out``."""
    import nbformat

    out = Path(out)
    sources = list(sources) if sources is not None else notebooks()
    copies = {}
    for src in sources:  # every source is read and converted before anything is written
        try:
            copies[src.name] = student_notebook(nbformat.read(src, as_version=4))
        except Exception as e:  # nbformat raises several types for unreadable or invalid notebooks
            raise ValueError(f"{src}: not a readable notebook ({e}); restore it from git") from e
    _claim(out)
    for name, nb in copies.items():
        write_text(out / name, nbformat.writes(nb) + "\n")
    return [out / name for name in copies]


# ------------------------------------------------------------------------------------------ the book


def run_times(run: str | Path) -> tuple[str, dict[str, tuple[str, float]]]:
    """(profile, ``{notebook file name: (status, seconds)}``) from the ``index.json`` ``isl reproduce`` wrote in
    ``run``; ``FileNotFoundError`` when there is none."""
    path = Path(run) / RUN_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `isl reproduce --out {run}` (or `make book`) first")
    record = read_json(path, "run record")
    return record["profile"], {name: (nb["status"], float(nb["seconds"])) for name, nb in record["notebooks"].items()}


def _check_run(run: Path) -> list[Path]:
    """The executed notebooks of an ``isl reproduce`` folder, or one clear error naming what is missing."""
    fix = f"run `isl reproduce --out {run}` (or `make book`) first"
    times = run_times(run)[1]
    executed = []
    for nb in notebooks():
        path = run / "notebooks" / nb.name
        status = times.get(nb.name, ("not run", 0.0))[0]
        if not path.is_file() or status != "ok":
            raise FileNotFoundError(f"{path}: not executed successfully ({RUN_RECORD}: {status}); {fix}")
        executed.append(path)
    return executed


def _claim(folder: Path) -> None:
    """Empty ``folder`` for a new build, refusing to touch a folder an earlier build did not write."""
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise FileExistsError(f"{folder}: exists and was not written by isl_core.course (no {MARKER}); "
                                  "move it away or choose another --out")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("written by isl_core.course; replaced by the next build\n")


def _readme_figures() -> list[tuple[str, Path]]:
    """(caption, file) of each ``docs/figures`` image the README shows, in README order, then any others."""
    readme = (REPO / "README.md").read_text(encoding="utf-8") if (REPO / "README.md").is_file() else ""
    shown = [(alt, REPO / rel) for alt, rel in re.findall(r"!\[([^\]]*)\]\((docs/figures/[^)\s]+\.png)\)", readme)]
    shown = [(alt, p) for alt, p in shown if p.is_file()]
    others = [(p.stem.replace("_", " "), p) for p in sorted((REPO / "docs" / "figures").glob("*.png"))
              if p not in {q for _, q in shown}]
    return shown + others


BUILD_ONLY_TAGS = ("injected-parameters",)  # papermill's cell: the build machine's parameters, absolute paths


def learner_outputs(nb, paths: dict[str, str]):
    """``nb`` as a learner's page: cells only the build needs (papermill's injected parameters) removed, stderr
    (warnings naming installed files) dropped, and every absolute path in ``paths`` replaced by its short name."""
    def clean(text):
        text = "".join(text) if isinstance(text, list) else text
        for long, short in sorted(paths.items(), key=lambda kv: -len(kv[0])):  # the longest (innermost) first
            text = text.replace(long, short)
        return text

    nb.cells = [c for c in nb.cells if not set(BUILD_ONLY_TAGS) & set(c.get("metadata", {}).get("tags", []))]
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        for out in cell.outputs:
            if "text" in out:
                out["text"] = clean(out["text"])
            for mime in [m for m in out.get("data", {}) if m.startswith("text/")]:
                out["data"][mime] = clean(out["data"][mime])
    return nb


def _build_paths(run: Path) -> dict[str, str]:
    """Absolute paths of the build machine and what the book shows instead."""
    run = run.resolve()
    return {str(run / "work"): "out_dir", str(run): "run", str(REPO.resolve()): ".", str(Path.home()): "~"}


def _executed_copy(src: Path, target: Path, profile: str, seconds: float, paths: dict[str, str]) -> None:
    """The executed notebook as a learner's page, with one line under its title: the profile and run time."""
    import nbformat

    nb = learner_outputs(nbformat.read(src, as_version=4), paths)
    note = nbformat.v4.new_markdown_cell(f"*Executed for this book with the `{profile}` profile in {seconds:.0f} s "
                                         "(every notebook's time: [Run times](../runtimes.md)).*")
    nb.cells.insert(1, note)
    nbformat.write(nb, target)


def assemble_book(run: str | Path, src: str | Path) -> Path:
    """Lay out the book's sources in ``src``: config, pages, executed notebooks, figures. Returns ``src``."""
    import yaml

    from isl_core import viz

    run, src = Path(run), Path(src)
    executed = _check_run(run)
    profile, times = run_times(run)
    _claim(src)
    for name in ("_config.yml", "_toc.yml", "index.md"):
        shutil.copy2(BOOK_SOURCES / name, src / name)
    (src / "notebooks").mkdir()
    for path in executed:
        _executed_copy(path, src / "notebooks" / path.name, profile, times[path.name][1], _build_paths(run))
    figures = src / "figures"
    figures.mkdir()
    import matplotlib.pyplot as plt

    plt.close(viz.pipeline_figure(figures / "pipeline.png"))
    lines = ["# Figures", "", "The figures of the README (the synthetic cohort, ISL round by round on one case, the "
             "demo's per-organ Dice) and the pipeline diagram.", "",
             "![the ISL pipeline](figures/pipeline.png)", ""]
    for caption, path in _readme_figures():
        shutil.copy2(path, figures / path.name)
        lines += [f"## {caption[:1].upper() + caption[1:]}", "", f"![{caption}](figures/{path.name})", ""]
    write_text(src / "figures.md", "\n".join(lines))
    rows = [f"| [{name}](notebooks/{Path(name).stem}.ipynb) | {status} | {secs:.0f} |"
            for name, (status, secs) in times.items()]
    write_text(src / "runtimes.md", "\n".join([
        "# Run times", "", f"Each notebook's wall time when this book was built (profile `{profile}`, executed in "
        "order by `isl reproduce`; later notebooks reuse the baseline and the experiment of earlier ones).", "",
        "| notebook | status | seconds |", "|---|---|---|", *rows, "",
        f"Total: {sum(s for _, s in times.values()):.0f} s.", ""]))
    toc = yaml.safe_load((BOOK_SOURCES / "_toc.yml").read_text(encoding="utf-8"))
    glossary = REPO / "docs" / "glossary.md"
    if glossary.is_file():
        shutil.copy2(glossary, src / "glossary.md")
    else:  # the glossary page is optional: drop it from the table of contents rather than link a missing page
        for part in toc.get("parts", []):
            part["chapters"] = [c for c in part["chapters"] if c.get("file") != "glossary"]
    write_text(src / "_toc.yml", yaml.safe_dump(toc, sort_keys=False))
    return src


def build_book(run: str | Path, out: str | Path = "outputs/book") -> Path:
    """Assemble the sources in ``OUT/src`` and build the HTML site into ``OUT/html``; returns its index.html."""
    jb = Path(sys.executable).with_name("jupyter-book")
    if not jb.is_file():
        raise FileNotFoundError(f"{jb}: Jupyter Book 1 is not installed; pip install -c constraints.txt "
                                "-e '.[course]'")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = assemble_book(run, out / "src")
    _claim(out / "_jb")
    proc = subprocess.run([str(jb), "build", str(src), "--path-output", str(out / "_jb"), "--builder", "html"],
                          capture_output=True, text=True)
    built = out / "_jb" / "_build" / "html"
    if proc.returncode != 0 or not (built / "index.html").is_file():
        raise RuntimeError(f"jupyter-book build {src} failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
                           f"\n{proc.stderr[-4000:]}")
    html = out / "html"
    _claim(html)
    shutil.copytree(built, html, dirs_exist_ok=True)
    return html / "index.html"


# ------------------------------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isl_core.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="student copies of the numbered notebooks (solutions stubbed)")
    student.add_argument("--out", default="outputs/student")
    book = sub.add_parser("book", help="the HTML book from the notebooks executed by `isl reproduce --out RUN`")
    book.add_argument("--run", default="outputs/book/run", help="the output folder of `isl reproduce`")
    book.add_argument("--out", default="outputs/book")
    args = parser.parse_args(argv)
    try:
        if args.command == "student":
            for path in write_student_copies(args.out):
                print(path)
        else:
            print(f"book: {build_book(args.run, args.out)}")
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
