"""Course material: student copies, the book, the pipeline diagram, the Binder set-up and the figure fixes.

The book test builds the real site (Jupyter Book 1) from stand-in executed notebooks: one tiny notebook is
executed for real (nbclient) and saved under each of the numbered names, with the ``index.md`` and
``index.json`` written by ``isl reproduce``'s own writer. That keeps this test at about half a minute; the numbered
notebooks are executed (once) by tests/test_notebooks.py, and ``make book`` builds from them.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest

from isl_core import course, viz
from isl_core.reproduce import NOTEBOOK_DIR, notebooks

REPO = NOTEBOOK_DIR.parent
SECRET = "answer_only_the_solution_knows = 42"


# ------------------------------------------------------------------------------------------ student copies


def _exercise_notebook(path: Path) -> Path:
    v4 = nbformat.v4
    code = v4.new_code_cell("x = 1\nprint(x)", outputs=[v4.new_output("stream", name="stdout", text="1\n")],
                            execution_count=3)
    nb = v4.new_notebook(cells=[
        v4.new_markdown_cell("# 99 · a test notebook"), code, v4.new_markdown_cell("## Exercises\n\n1. Do it."),
        v4.new_code_cell(SECRET, metadata={"tags": ["solution"]}, execution_count=4,
                         outputs=[v4.new_output("execute_result", data={"text/plain": "42"}, execution_count=4)]),
        v4.new_markdown_cell("The solution prints 42 because ...", metadata={"tags": ["solution"]}),
        v4.new_markdown_cell("2. Now the second exercise."),
        v4.new_code_cell("second_solution = 2", metadata={"tags": ["solution", "other"]}),
    ])
    nbformat.write(nb, path)
    return path


def test_student_copy_replaces_solutions_with_stubs(tmp_path):
    src = _exercise_notebook(tmp_path / "99_test.ipynb")
    original = src.read_bytes()
    [copy] = course.write_student_copies(tmp_path / "student", [src])
    assert src.read_bytes() == original, "the source notebook was modified"
    nb = nbformat.read(copy, as_version=4)
    nbformat.validate(nb)
    sources = [c.source for c in nb.cells]
    assert not [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert SECRET not in "".join(sources) and "second_solution" not in "".join(sources)
    assert "The solution prints 42" not in "".join(sources)
    # two runs of solution cells -> two stubs, each a hint then an empty code cell; the rest kept in order
    assert sources.count(course.STUB_CODE) == 2 and sources.count(course.STUB_HINT) == 2
    assert sources[:3] == ["# 99 · a test notebook", "x = 1\nprint(x)", "## Exercises\n\n1. Do it."]
    assert sources[3:] == [course.STUB_HINT, course.STUB_CODE, "2. Now the second exercise.", course.STUB_HINT,
                           course.STUB_CODE]
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert len({c.id for c in nb.cells}) == len(nb.cells)


def test_student_copies_refuse_a_folder_they_did_not_write(tmp_path):
    src = _exercise_notebook(tmp_path / "99_test.ipynb")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by isl_core.course"):
        course.write_student_copies(mine, [src])
    assert (mine / "notes.txt").read_text() == "keep me"
    bad = tmp_path / "98_broken.ipynb"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="98_broken.ipynb: not a readable notebook"):
        course.write_student_copies(tmp_path / "student", [bad])


def test_numbered_notebooks_have_solutions_and_their_student_copies_none(tmp_path):
    copies = course.write_student_copies(tmp_path / "student")
    assert [c.name for c in copies] == [p.name for p in notebooks()]
    for src, copy in zip(notebooks(), copies):
        cells = nbformat.read(src, as_version=4).cells
        solutions = [c for c in cells if course._is_solution(c)]
        assert solutions, f"{src.name}: no cell tagged 'solution' (each notebook ends with exercises and solutions)"
        student = nbformat.read(copy, as_version=4)
        nbformat.validate(student)
        assert not [c for c in student.cells if course._is_solution(c)]
        text = "\n".join(c.source for c in student.cells)
        given = "\n".join(c.source for c in cells if not course._is_solution(c))  # lines the text shows anyway
        for cell in solutions:
            code = [line for line in cell.source.splitlines() if len(line.strip()) > 20 and line not in given]
            assert code, f"{src.name}: a solution cell that only repeats the notebook's own code"
            assert not any(line in text for line in code), f"{copy.name}: solution code left in the student copy"
        assert course.STUB_CODE in [c.source for c in student.cells]
        checks = [c.source for c in cells if "check" in c.metadata.get("tags", [])]
        assert len(checks) == 1, f"{src.name}: one check cell (the implement-it exercise)"
        assert [c.source for c in student.cells if "check" in c.metadata.get("tags", [])] == checks, \
            f"{copy.name}: the check cell must stay in the student copy"


# ------------------------------------------------------------------------------------------ the book

STAND_IN = """\
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot([0, 1], [1, 0])
plt.show()
print("stand-in ran")
"""


@pytest.fixture(scope="module")
def executed_run(tmp_path_factory):
    """A folder shaped like ``isl reproduce``'s output, with an executed stand-in for every numbered notebook."""
    from nbclient import NotebookClient

    from isl_core.reproduce import _index

    run = tmp_path_factory.mktemp("run")
    # papermill's cell with the build machine's path, and a cell that prints it and writes to stderr
    injected = nbformat.v4.new_code_cell(f'run_dir = "{run}"  # injected', metadata={"tags": ["injected-parameters"]})
    prints = nbformat.v4.new_code_cell('import sys\nprint("results  " + run_dir + "/work/experiment")\n'
                                       'print("warn" + "ing: stderr", file=sys.stderr)')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# title"),
                                         nbformat.v4.new_code_cell(STAND_IN), injected, prints])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    rows = []
    for i, path in enumerate(notebooks()):
        nb.cells[0].source = f"# {path.name[:2]} · stand-in for {path.stem}"
        (run / "notebooks").mkdir(exist_ok=True)
        nbformat.write(nb, run / "notebooks" / path.name)
        rows.append((path.name, "ok", 10.0 + i, f"notebooks/{path.name}"))
    _index(run, rows, "ci")
    return run


def test_run_times_are_passed_as_data(executed_run):
    """What ``isl reproduce`` records (index.json beside index.md) is what the book reads, unrounded."""
    profile, times = course.run_times(executed_run)
    assert profile == "ci"
    assert times == {p.name: ("ok", 10.0 + i) for i, p in enumerate(notebooks())}
    assert list(times) == [p.name for p in notebooks()]  # in execution order


def test_book_links_every_notebook_with_its_figures(executed_run, tmp_path):
    index = course.build_book(executed_run, tmp_path / "book")
    assert index == tmp_path / "book" / "html" / "index.html"
    html = index.read_text(encoding="utf-8")
    assert "10.1002/mp.17883" in html and "Chen, Liu, Li, Han, Xing" in html
    assert re.search(r'<img[^>]+src="[^"]*pipeline\.png"', html), "the pipeline diagram is missing"
    for path in notebooks():
        page = f"notebooks/{path.stem}.html"
        assert f'href="{page}"' in html, f"index.html does not link {page}"
        body = (index.parent / page).read_text(encoding="utf-8")
        srcs = re.findall(r'<img[^>]+src="([^"]+)"', body)
        assert srcs, f"{page}: no figure"
        for src in srcs:
            assert src.startswith("data:image/") or (index.parent / page).parent.joinpath(src).resolve().is_file(), src
        assert "stand-in ran" in body
        assert str(executed_run) not in body and "# injected" not in body and "warning: stderr" not in body, page
        assert "results  out_dir/experiment" in body, f"{page}: the build's path is not shortened"
        secs = 10 + int(path.name[:2])  # the stand-in index.md gives notebook NN a run time of 10 + NN s
        assert re.search(rf"Executed for this book with the <code[^>]*><span[^>]*>ci</span></code> profile in "
                         rf"{secs} s", body), f"{page}: the profile and run time line is missing"
    runtimes = (index.parent / "runtimes.html").read_text(encoding="utf-8")
    for path in notebooks():
        secs = 10 + int(path.name[:2])
        assert re.search(rf"{path.name}</span></a></p></td>\s*<td><p>ok</p></td>\s*<td><p>{secs}</p></td>",
                         runtimes), f"runtimes.html: no row for {path.name} with {secs} s"
    figures = (index.parent / "figures.html").read_text(encoding="utf-8")
    for png in (REPO / "docs" / "figures").glob("*.png"):
        assert png.name in figures, f"README figure {png.name} missing from the book"
    assert ((index.parent / "glossary.html").is_file()) == (REPO / "docs" / "glossary.md").is_file()


def test_book_includes_the_glossary_and_readme_figures_it_finds(executed_run, tmp_path, monkeypatch):
    """Both branches of the optional glossary page, on a stand-in repository folder."""
    import shutil

    fake = tmp_path / "repo"
    (fake / "docs" / "figures").mkdir(parents=True)
    shutil.copy2(REPO / "docs" / "figures" / "cohort.png", fake / "docs" / "figures" / "shown.png")
    shutil.copy2(REPO / "docs" / "figures" / "cohort.png", fake / "docs" / "figures" / "extra_one.png")
    (fake / "README.md").write_text("# x\n\n![a caption from the README](docs/figures/shown.png)\n")
    (fake / "docs" / "glossary.md").write_text("# Glossary\n\nHU\n: Hounsfield units, the CT intensity scale.\n")
    monkeypatch.setattr(course, "REPO", fake)
    html = course.build_book(executed_run, tmp_path / "book").parent
    glossary = (html / "glossary.html").read_text(encoding="utf-8")
    assert "Hounsfield units" in glossary
    assert 'href="glossary.html"' in (html / "index.html").read_text(encoding="utf-8")
    figures = (html / "figures.html").read_text(encoding="utf-8")
    assert "A caption from the README" in figures and "extra one" in figures
    assert figures.index("shown.png") < figures.index("extra_one.png")  # README order first


def test_book_stops_on_a_run_that_is_not_complete(executed_run, tmp_path):
    run = tmp_path / "run"
    (run / "notebooks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="index.json: missing; run `isl reproduce"):
        course.build_book(run, tmp_path / "book")
    (run / "index.json").write_text((executed_run / "index.json").read_text())
    with pytest.raises(FileNotFoundError, match="00_data_and_phantoms.ipynb: not executed successfully"):
        course.build_book(run, tmp_path / "book")
    assert not (tmp_path / "book" / "html").exists()


def test_make_targets_and_config():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bbook\b.*\bstudent\b", make, re.M)
    assert "isl reproduce --profile $(BOOK_PROFILE) --out $(BOOK_RUN)" in make
    assert re.search(r"^BOOK_PROFILE \?= quick$", make, re.M)
    import yaml

    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    toc = yaml.safe_load((REPO / "book" / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert [f for f in files if f.startswith("notebooks/")] == [f"notebooks/{p.stem}" for p in notebooks()]


# ------------------------------------------------------------------------------------------ Binder


def test_binder_installs_cpu_torch_and_the_kit():
    req = (REPO / "binder" / "requirements.txt").read_text().splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in req
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert f"torch=={pins['torch']}+cpu" in req, "Binder's torch must be the pinned version's CPU build"
    post = REPO / "binder" / "postBuild"
    assert post.stat().st_mode & 0o111, "binder/postBuild must be executable"
    assert re.search(r'pip install .*-c constraints\.txt -e "\.\[notebooks\]"', post.read_text())
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("jupyter-book") and "<2" in r for r in extras["course"])


def test_binder_defaults_to_the_smoke_profile_with_quick_one_parameter_away(monkeypatch):
    import os
    import subprocess

    start = REPO / "binder" / "start"
    assert start.stat().st_mode & 0o111, "binder/start must be executable"
    show = ["python3", "-c", "import os; print(os.environ['ISL_PROFILE'])"]
    env = {k: v for k, v in os.environ.items() if k != "ISL_PROFILE"}
    assert subprocess.run([str(start), *show], env=env, capture_output=True, text=True).stdout.strip() == "smoke"
    env["ISL_PROFILE"] = "quick"  # what a Binder user (or a later repo2docker layer) sets is kept
    assert subprocess.run([str(start), *show], env=env, capture_output=True, text=True).stdout.strip() == "quick"
    from isl_core import notebook

    monkeypatch.setenv("ISL_PROFILE", "smoke")
    monkeypatch.delenv("ISL_OUT_DIR", raising=False)
    monkeypatch.delenv("ISL_DATA_DIR", raising=False)
    assert notebook.resolve()[0] == "smoke" and notebook.resolve("quick")[0] == "quick"  # the parameter wins


# ------------------------------------------------------------------------------------------ figures


def test_pipeline_figure_shows_the_three_stages_and_the_loop(tmp_path):
    fig = viz.pipeline_figure(tmp_path / "pipeline.png")
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    for words in ("Stage 1", "Stage 2", "Stage 3", "repeat for rounds", r"\beta M + (1 - \beta) P", "arg"):
        assert words in text, words
    assert (tmp_path / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close(fig)


def test_organ_dice_legend_is_outside_the_bars():
    import pandas as pd

    table = pd.DataFrame({"baseline": [0.98, 0.5], "isl-mask": [0.99, 0.6]}, index=["liver", "spleen"])
    fig = viz.organ_dice_figure(table)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1, "the legend overlaps the axes (and the tallest bars)"
    plt.close(fig)


def test_case_grid_uses_the_voxel_spacing_and_separates_row_titles():
    image = np.zeros((40, 30, 10), np.float32)
    fig = viz.case_grid([("first row title that is long", image, None), ("second", image, None)],
                        spacing=(1.0, 2.0, 5.0))
    fig.canvas.draw()
    axes = [ax for sub in fig.subfigs[:2] for ax in sub.axes]
    axial, coronal = axes[0], axes[2]
    assert axial.get_aspect() == pytest.approx(2.0)  # rows: y (2 mm), columns: x (1 mm)
    assert coronal.get_aspect() == pytest.approx(5.0)  # rows: z (5 mm), columns: x (1 mm)
    titles = [sub._suptitle.get_text() for sub in fig.subfigs[:2]]
    assert titles == ["first row title that is long", "second"]
    first_row_bottom = min(ax.get_window_extent().y0 for ax in fig.subfigs[0].axes)
    second_title_top = fig.subfigs[1]._suptitle.get_window_extent().y1
    assert second_title_top < first_row_bottom, "the second row's title runs into the first row's images"
    with pytest.raises(ValueError, match="spacing must be"):
        viz.case_grid([("a", image, None)], spacing=[(1, 1, 1), (1, 1, 1)])
    plt.close(fig)


def test_course_command_line_reports_a_missing_run(tmp_path, capsys):
    assert course.main(["book", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "book")]) == 2
    assert "index.json: missing" in capsys.readouterr().err
