"""The numbered notebooks: course-ready structure, committed clean, and every cell (solutions included) runs.

* Static checks (no execution): the opening cites the paper, exactly one ``parameters`` cell with empty defaults
  (``isl_core.notebook.setup`` resolves them), a guarded install cell first, no hand-made profile overrides,
  ``## Exercises`` with at least two exercises and a ``solution``-tagged cell, and no outputs in git.
* ``executed`` (module fixture, run once): ``isl_core.reproduce.run_notebooks(profile="smoke")`` executes all seven
  with papermill, exactly as ``isl reproduce --profile smoke`` does; the solution cells are ordinary code cells,
  so they run too.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest

from isl_core import config, notebook
from isl_core.reproduce import notebooks

NOTEBOOKS = notebooks()
PARAMETERS = ("profile", "data_dir", "out_dir", "device", "seed")
DOI = "doi:10.1002/mp.17883"


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _stdout(cells: list[dict]) -> str:
    """Everything the cells printed (a stream's text is a string or, as saved by papermill, a list of strings)."""
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []) if o.get("name") == "stdout")


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


# ------------------------------------------------------------------------------------------ static checks


def test_the_seven_notebooks_are_there():
    assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_stripped(path):
    nb = _load(path)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opening(path):
    cells = _load(path)["cells"]
    first = _source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and first.startswith(f"# {path.name[:2]} · "), first[:80]
    assert DOI in first, f"{path.name}: the first cell must cite the paper ({DOI})"
    assert "Medical Physics" in first and "Inference-specific learning" in first
    assert "What you will learn" in first
    assert re.search(r"\*\*Run time:\*\* about \d+ s at the `quick` profile on 2 CPU cores", first), first
    code = [c for c in cells if c["cell_type"] == "code"]
    install = _source(code[0])
    assert "import isl_core" in install and "except ImportError" in install and "ISL_KIT_SOURCE" in install, \
        f"{path.name}: the first code cell must be the guarded install cell"
    assert "torch==" not in install, f"{path.name}: the install cell must keep the service's own torch"


def test_install_cell_is_the_same_everywhere():
    first_code = {_source(next(c for c in _load(p)["cells"] if c["cell_type"] == "code")) for p in NOTEBOOKS}
    assert len(first_code) == 1, "the guarded install cells differ between notebooks"


def test_notebook_00_says_what_is_reconstructed():
    first = _source(_load(NOTEBOOKS[0])["cells"][0])
    assert "Only the paper's abstract is public" in first and "docs/paper_reconstruction.md" in first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_and_setup(path):
    cells = _load(path)["cells"]
    tagged = [c for c in cells if "parameters" in _tags(c)]
    assert len(tagged) == 1, f"{path.name}: exactly one cell must carry the tag 'parameters'"
    source = _source(tagged[0])
    for name in PARAMETERS:
        assert re.search(rf"^{name} = ", source, re.M), f"{path.name}: parameter {name!r} missing"
    for name in ("profile", "data_dir", "out_dir"):
        assert re.search(rf'^{name} = ""', source, re.M), f"{path.name}: {name} must default to empty (resolved)"
    code = "\n".join(_source(c) for c in cells if c["cell_type"] == "code")
    assert "notebook.setup(profile, data_dir, out_dir, device, seed)" in code
    assert "print_config()" in code
    assert not re.search(r"if\s+profile\s*==", code), f"{path.name}: no hand-made per-profile overrides"
    assert "write_cohort(data_dir" not in code and "os.environ.get(\"ISL_OUT_DIR" not in code, \
        "set-up code belongs in notebook.setup()"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_with_solutions(path):
    cells = _load(path)["cells"]
    heads = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and
             re.search(r"^## Exercises\s*$", _source(c), re.M)]
    assert len(heads) == 1, f"{path.name}: one '## Exercises' section"
    items = re.findall(r"^\d+\. \*\*", _source(cells[heads[0]]), re.M)
    assert 2 <= len(items) <= 4, f"{path.name}: 2-4 exercises, found {len(items)}"
    assert "Expect" in _source(cells[heads[0]]) or "expect" in _source(cells[heads[0]])
    after = cells[heads[0]:]
    solutions = [c for c in after if "solution" in _tags(c)]
    assert len(solutions) >= len(items), f"{path.name}: every exercise needs a solution cell tagged 'solution'"
    assert all(c["cell_type"] == "code" for c in solutions)
    assert not any("solution" in _tags(c) for c in cells[:heads[0]]), "solutions belong in the Exercises section"


def test_glossary_defines_the_terms():
    text = (notebook.REPO / "docs" / "glossary.md").read_text()
    for term in ("HU", "Softmax", "One-hot", "Arg-max", "Cross-entropy", "Adam", "Patch", "HD95", "Dice", "Atlas",
                 "Registration", "LNCC", "Moving average", "Domain shift"):
        assert re.search(rf"^\*\*{re.escape(term)}\b", text, re.M), f"docs/glossary.md: {term} is not defined"


# ------------------------------------------------------------------------------------------ set-up resolution


def test_resolve_defaults_to_the_teaching_profile(monkeypatch):
    for var in ("ISL_PROFILE", "ISL_OUT_DIR", "ISL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    name, data, out = notebook.resolve()
    assert name == notebook.DEFAULT_PROFILE == "quick"
    assert out == notebook.REPO / "outputs" / "notebooks-quick" and data == out / "data"


def test_resolve_reads_the_environment_then_the_parameters(monkeypatch, tmp_path):
    monkeypatch.setenv("ISL_PROFILE", "smoke")
    monkeypatch.setenv("ISL_OUT_DIR", str(tmp_path / "out"))
    monkeypatch.delenv("ISL_DATA_DIR", raising=False)
    assert notebook.resolve() == ("smoke", tmp_path / "out" / "data", tmp_path / "out")
    monkeypatch.setenv("ISL_DATA_DIR", str(tmp_path / "data"))
    assert notebook.resolve()[1] == tmp_path / "data"
    assert notebook.resolve("ci", tmp_path / "d", tmp_path / "o") == ("ci", tmp_path / "d", tmp_path / "o")


def test_resolve_refuses_an_unknown_profile(monkeypatch):
    monkeypatch.setenv("ISL_PROFILE", "quik")
    with pytest.raises(ValueError, match="quik.*ISL_PROFILE"):
        notebook.resolve()
    assert "smoke" in config.PROFILE_NAMES


# ------------------------------------------------------------------------------------------ execution


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run every notebook once with papermill at the smoke profile; yields the output folder and wall time."""
    from isl_core.reproduce import run_notebooks

    out = tmp_path_factory.mktemp("reproduce")
    t0 = time.perf_counter()
    status = run_notebooks(out=out, profile="smoke", device="cpu")
    seconds = time.perf_counter() - t0
    print(f"\nrun_notebooks(profile='smoke'): {seconds:.0f} s")
    return {"out": out, "status": status, "seconds": seconds}


@pytest.mark.slow
def test_every_notebook_runs_with_its_solutions(executed):
    out = executed["out"]
    index = (out / "index.md").read_text()
    rows = re.findall(r"^\| \[(\S+\.ipynb)\]\(\S+\) \| ([^|]+) \| (\d+) \|$", index, re.M)
    assert executed["status"] == 0, f"a notebook failed:\n{index}"
    assert [name for name, _, _ in rows] == [p.name for p in NOTEBOOKS], index
    assert all(status.strip() == "ok" for _, status, _ in rows), index
    for path in NOTEBOOKS:
        cells = _load(out / "notebooks" / path.name)["cells"]
        solutions = [c for c in cells if "solution" in _tags(c)]
        assert solutions and all(c["execution_count"] is not None and c["outputs"] for c in solutions), \
            f"{path.name}: a solution cell did not run or printed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_notebook_shows_a_figure(executed, path):
    nb = _load(executed["out"] / "notebooks" / path.name)
    pngs = [o["data"]["image/png"] for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert pngs, f"{path.name}: no static figure in the executed notebook"
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = _stdout(nb["cells"])
    assert "profile  smoke" in text, f"{path.name}: the papermill parameter did not reach setup()"


@pytest.mark.slow
def test_shared_folders_are_reused(executed):
    """01 trains the baseline into out_dir/baseline; the experiment of 04-06 uses that same folder."""
    work = executed["out"] / "work"
    assert (work / "baseline" / "model.pt").is_file()
    assert not (work / "experiment" / "baseline").exists(), "the experiment retrained its own baseline"
    from isl_core.segment import model_fingerprint

    settings = json.loads((work / "experiment" / "experiment.json").read_text())
    assert settings["stamp"]["model"] == model_fingerprint(work / "baseline")  # the very weights of notebook 01
    summary = json.loads((work / "experiment" / "summary.json").read_text())
    assert set(config.METHODS) <= set(summary["methods"])


@pytest.mark.slow
def test_results_are_stated_from_the_run(executed):
    """The ablation notebooks say in words what this run found (05: whether M beat P; 06: the ranking)."""
    def stdout(name: str) -> str:
        cells = _load(executed["out"] / "notebooks" / name)["cells"]
        return _stdout(cells)

    assert re.search(r"The moving average (raised|lowered) the mean Dice of isl-mask from", stdout(NOTEBOOKS[5].name))
    assert re.search(r"the moving average (beat|did not beat) P by [+-]\d", stdout(NOTEBOOKS[5].name))
    assert "- Ranking: " in stdout(NOTEBOOKS[6].name)


@pytest.mark.slow
def test_book_builds_from_the_executed_notebooks(executed, tmp_path):
    """`make book` on the real notebooks: every page linked, each with its figures (no second execution)."""
    from isl_core.course import build_book

    index = build_book(executed["out"], tmp_path / "book")
    html = index.read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f'href="notebooks/{path.stem}.html"' in html, f"index.html does not link {path.name}"
        assert "<img" in (index.parent / "notebooks" / f"{path.stem}.html").read_text(encoding="utf-8"), path.name
