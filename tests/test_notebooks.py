"""The numbered notebooks: course-ready structure, committed clean, and every cell (solutions included) runs.

* Static checks (no execution): the opening cites the paper, exactly one ``parameters`` cell with empty defaults
  (``isl_core.notebook.setup`` resolves them), a guarded install cell first, no hand-made profile overrides,
  ``## Exercises`` with at least two exercises and a ``solution``-tagged cell, and no outputs in git.
* ``executed`` (module fixture, run once): ``isl_core.reproduce.run_notebooks(profile="smoke", jobs=2)`` executes
  all eight with papermill, exactly as ``isl reproduce --profile smoke --jobs 2`` does (the chains of
  ``reproduce.STAGES`` side by side); the solution cells are ordinary code cells, so they run too.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
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


def test_the_eight_notebooks_are_there():
    assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06", "07"]


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
    assert re.search(r"\*\*Time to work through:\*\* about \d+ min", first), f"{path.name}: the learner's time"
    assert "**You should know:**" in first, f"{path.name}: the prerequisites"
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
def test_exercises_ask_before_they_tell(path):
    """Every exercise asks for a prediction; what to expect is said only in the cells tagged `solution`."""
    cells = _load(path)["cells"]
    heads = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and
             re.search(r"^## Exercises\s*$", _source(c), re.M)]
    assert len(heads) == 1, f"{path.name}: one '## Exercises' section"
    prompt = _source(cells[heads[0]])
    items = re.split(r"^\d+\. \*\*", prompt, flags=re.M)[1:]
    assert 3 <= len(items) <= 4, f"{path.name}: 3-4 exercises, found {len(items)}"
    assert all("*Predict first:*" in item for item in items), f"{path.name}: an exercise that does not ask to predict"
    assert items[-1].startswith("Implement it:"), f"{path.name}: the last exercise is the implement-it one"
    after = cells[heads[0]:]
    shown = "\n".join(_source(c) for c in after if "solution" not in _tags(c))
    assert not re.search(r"\bexpect", shown, re.I), f"{path.name}: an expected result stated outside a solution cell"
    solutions = [c for c in after if "solution" in _tags(c)]
    code = [c for c in solutions if c["cell_type"] == "code"]
    why = [c for c in solutions if c["cell_type"] == "markdown"]
    assert len(code) == len(items) == len(why), f"{path.name}: each exercise needs a solution and its explanation"
    assert all(_source(c).startswith("**What to expect and why.**") for c in why)
    assert not any("solution" in _tags(c) for c in cells[:heads[0]]), "solutions belong in the Exercises section"
    printed = [c for c in code[:-1] if "print(" in _source(c)]
    assert len(printed) == len(code) - 1, f"{path.name}: a solution that does not say in words what it found"


def _implement_it(path: Path) -> tuple[str, str, str]:
    """(function name, solution code, check code) of a notebook's implement-it exercise."""
    cells = _load(path)["cells"]
    [j] = [i for i, c in enumerate(cells) if "check" in _tags(c)]
    check = _source(cells[j])
    func = re.search(r'globals\(\)\.get\("(\w+)"\)', check).group(1)
    solution = next(_source(c) for c in reversed(cells[:j]) if c["cell_type"] == "code" and "solution" in _tags(c))
    return func, solution, check


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_check_passes_on_the_solution_and_fails_on_the_stub(path, capsys):
    """The check cell runs against the solution cell (it passes) and against the student copy's stub (it fails,
    saying what to write), both without executing the notebook."""
    import nbformat

    from isl_core import course, course_checks

    func, solution, check = _implement_it(path)
    assert "check_" in check and "# NBVAL_CHECK_OUTPUT" in check
    cells = _load(path)["cells"]
    imports = next(_source(c) for c in cells if c["cell_type"] == "code" and "from isl_core import notebook" in
                   _source(c)).replace("notebook.print_config()", "")
    namespace = {}
    exec(compile(imports, f"{path.name}:imports", "exec"), namespace)  # the solution sees the notebook's imports
    exec(compile(solution, f"{path.name}:solution", "exec"), namespace)  # the solution cell defines the function
    capsys.readouterr()
    exec(compile(check, f"{path.name}:check", "exec"), namespace)
    assert capsys.readouterr().out.startswith("correct: ")
    assert course_checks.CHECKS[path.name[:2]].__name__ in check, f"{path.name}: the check of another notebook"

    student = course.student_notebook(nbformat.read(path, as_version=4))
    [j] = [i for i, c in enumerate(student.cells) if "check" in c.metadata.get("tags", [])]
    stub = student.cells[j - 1].source
    assert stub == course.STUB_CODE, f"{path.name}: the cell before the check is not the stub"
    namespace = {}
    exec(stub, namespace)
    with pytest.raises(course_checks.CheckFailed, match=rf"`{func}` is not defined yet: write `def {func}\("):
        exec(compile(check, f"{path.name}:check", "exec"), namespace)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_figure_has_alt_text(path):
    """Each cell that draws (a figure or the viewer) carries alt text in its metadata, which the book puts on the
    image (myst-nb's `mystnb.image.alt`)."""
    for i, cell in enumerate(_load(path)["cells"]):
        src = _source(cell)
        if cell["cell_type"] == "code" and ("plt.show()" in src or "slice_viewer(" in src):
            alt = cell["metadata"].get("mystnb", {}).get("image", {}).get("alt", "")
            assert len(alt) > 40, f"{path.name} cell {i}: a figure without alt text (metadata mystnb.image.alt)"


def test_pipeline_figure_in_notebooks_00_and_03():
    for path in (NOTEBOOKS[0], NOTEBOOKS[3]):
        assert "fig = pipeline_figure()" in "".join(_source(c) for c in _load(path)["cells"]), path.name


def test_glossary_defines_the_terms():
    text = (notebook.REPO / "docs" / "glossary.md").read_text()
    for term in ("HU", "Softmax", "One-hot", "Arg-max", "Cross-entropy", "Adam", "Patch", "HD95", "Dice", "Atlas",
                 "Registration", "LNCC", "Moving average", "Domain shift", "ISL", "f0", "P", "M", r"D\\\*", "MALF",
                 "Folding", "Wilcoxon", "Holm", "Bootstrap", "Working grid", "Source geometry",
                 "Test-time adaptation", "TENT", "Pseudo-label", "Entropy", "Control arm"):
        assert re.search(rf"^\*\*{term}[\s.(,]", text, re.M), f"docs/glossary.md: {term} is not defined"


def test_method_table_and_organ_means_average_seeds_per_case_first():
    rows = []
    for seed, (b, m) in enumerate([(0.5, 0.7), (0.7, 0.7)]):  # case c1: baseline 0.6, method 0.7 over seeds
        for organ, shift in (("liver", 0.0), ("spleen", 0.2)):
            rows += [{"case": "c1", "seed": seed, "method": "baseline", "organ": organ, "dice": b + shift,
                      "seconds": 1.0},
                     {"case": "c1", "seed": seed, "method": "arm", "organ": organ, "dice": m + shift, "seconds": 3.0}]
    for method, dice in (("baseline", 0.4), ("arm", 0.3)):  # case c2, one seed only
        rows += [{"case": "c2", "seed": 0, "method": method, "organ": o, "dice": dice, "seconds": 5.0}
                 for o in ("liver", "spleen")]
    per_case = pd.DataFrame(rows)
    table = notebook.method_table(per_case, ["baseline", "arm"])
    assert table.loc["baseline", "mean_dice"] == pytest.approx((0.7 + 0.4) / 2)  # c1: (0.6 + 0.8) / 2 = 0.7
    assert table.loc["arm", "mean_dice"] == pytest.approx((0.8 + 0.3) / 2)
    assert table.loc["arm", "delta_vs_baseline"] == pytest.approx(((0.8 - 0.7) + (0.3 - 0.4)) / 2)
    organs = notebook.organ_means(per_case, ["baseline", "arm"])
    assert list(organs.index) == ["liver", "spleen"] and list(organs.columns) == ["baseline", "arm"]
    assert organs.loc["spleen", "baseline"] == pytest.approx((0.8 + 0.4) / 2)


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


def test_schedule_runs_each_notebook_once_and_after_what_it_reads():
    from isl_core.reproduce import schedule

    assert schedule(NOTEBOOKS, jobs=1) == [[NOTEBOOKS]]  # one after another, as before --jobs
    stages = schedule(NOTEBOOKS + [Path("99_extra.ipynb")], jobs=2)
    flat = [p.name for stage in stages for chain in stage for p in chain]
    assert sorted(flat) == sorted([p.name for p in NOTEBOOKS] + ["99_extra.ipynb"])
    assert stages[-1] == [[Path("99_extra.ipynb")]]  # a notebook no stage names runs last, alone
    stage_of = {p.name[:2]: i for i, stage in enumerate(stages) for chain in stage for p in chain}
    assert all(stage_of[n] > stage_of["01"] for n in ("02", "03", "04", "05", "06", "07"))
    only = [p for p in NOTEBOOKS if p.name[:2] in ("03", "05")]
    assert schedule(only, jobs=2) == [[[only[1]], [only[0]]]]  # empty chains and stages dropped


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_notebook_stops_its_chain_and_the_later_stages(tmp_path, jobs):
    """Stand-in notebooks (one cell each): 01 fails. One at a time, 00 ran before it; two at a time, 00 runs beside
    it and finishes. Either way 02 (a later stage) never starts, the run returns 1 and the record says which
    failed."""
    import nbformat
    from helpers import tiny_cohort

    from isl_core.reproduce import RUN_RECORD, run_notebooks

    folder = tmp_path / "nbs"
    folder.mkdir()
    for name, code in (("00_a", "x = 1"), ("01_b", "raise ValueError('stand-in')"), ("02_c", "x = 2")):
        parameters = nbformat.v4.new_code_cell("# parameters", metadata={"tags": ["parameters"]})
        nb = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell(code)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    out = tmp_path / "run"
    status = run_notebooks(out=out, profile="ci", data=tiny_cohort(tmp_path / "data"), device="cpu",
                           notebook_folder=folder, jobs=jobs)
    record = json.loads((out / RUN_RECORD).read_text())
    assert status == 1 and record["jobs"] == jobs
    assert {n: r["status"] for n, r in record["notebooks"].items()} == {
        "00_a.ipynb": "ok", "01_b.ipynb": "failed (cell 3: ValueError)"}  # after papermill's injected parameters
    assert not (out / "notebooks" / "02_c.ipynb").exists()


def test_the_chains_of_a_stage_share_no_results():
    """What ``reproduce.STAGES`` relies on, read from the notebooks' code: the shared experiment is run and read
    in one chain only, starting with the notebook that runs it first; the baseline every notebook after 01 loads is
    trained by 01, in an earlier stage; and no notebook writes into another chain's results."""
    from isl_core.reproduce import STAGES

    code = {p.name[:2]: "\n".join(_source(c) for c in _load(p)["cells"] if c["cell_type"] == "code")
            for p in NOTEBOOKS}
    chains = [chain for stage in STAGES for chain in stage]
    users = {n for n, src in code.items() if "setup.experiment(" in src}
    [home] = [chain for chain in chains if users & set(chain)]
    assert users <= set(home), f"notebooks {sorted(users - set(home))} read the experiment outside chain {home}"
    assert "setup.baseline(" in code["01"] and ("01",) in STAGES[0]
    assert all("setup.baseline(" not in code[n] for chain in STAGES[0] if chain != ("01",) for n in chain)

    def folders(n: str) -> set[str]:
        """The results folders under out_dir a notebook writes: its own literals and those of the setup helpers."""
        names = set(re.findall(r'out_dir / "([^"]+)"', code[n]))
        helpers = {"experiment": n in users, "experiment_arms": "arms_cases(" in code[n]}
        return names | {name for name, used in helpers.items() if used}

    for stage in STAGES:
        for i, a in enumerate(stage):
            for b in stage[i + 1:]:
                shared = {f for n in a for f in folders(n)} & {f for n in b for f in folders(n)}
                assert not shared, f"chains {a} and {b} both write {sorted(shared)}"


# ------------------------------------------------------------------------------------------ execution


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run every notebook once with papermill at the smoke profile; yields the output folder and wall time."""
    from isl_core.reproduce import run_notebooks

    out = tmp_path_factory.mktemp("reproduce")
    t0 = time.perf_counter()
    status = run_notebooks(out=out, profile="smoke", device="cpu", jobs=2)
    seconds = time.perf_counter() - t0
    print(f"\nrun_notebooks(profile='smoke', jobs=2): {seconds:.0f} s")
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
        solutions = [c for c in cells if "solution" in _tags(c) and c["cell_type"] == "code"]
        assert solutions and all(c["execution_count"] is not None and c["outputs"] for c in solutions), \
            f"{path.name}: a solution cell did not run or printed nothing"
        [check] = [c for c in cells if "check" in _tags(c)]
        assert _stdout([check]).startswith("correct: "), f"{path.name}: the check failed on the solution"


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
    assert list(summary["methods"]) == list(notebook.COURSE_METHODS)  # the control arms only on request (07)


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
def test_tta_notebook_reads_the_committed_arms_and_runs_them_on_request(executed):
    """07 reads the committed cross-validated run by default; ``arms_here`` runs the arms on this run's inference
    cases with the shared experiment's f0, so its baseline is the shared experiment's to the bit."""
    out = executed["out"]
    printed = _stdout(_load(out / "notebooks" / NOTEBOOKS[7].name)["cells"])
    assert "Sections 2-3 read the cross-validated phantom run of docs/claims.md" in printed, printed[-2000:]
    assert re.search(r"TENT's mean entropy went from [\d.]+ to [\d.]+ nats in \d+ steps", printed)

    setup = notebook.setup("smoke", out / "data", out / "work", "cpu")
    per_case, where = setup.arms_cases(here=True)
    assert where.startswith("this run's 2 inference cases")
    assert set(per_case["method"]) == set(notebook.COURSE_METHODS) | set(notebook.TTA_ARMS)
    shared = per_case[per_case["method"] != "baseline"].groupby("method")["case"].apply(set)
    assert all(cases == shared["isl-mask-ema"] for cases in shared), "the arms ran on other cases than ISL"
    arms_baseline = pd.read_csv(out / "work" / "experiment_arms" / "per_case.csv").query("method == 'baseline'")
    ref = per_case.query("method == 'baseline'")
    np.testing.assert_allclose(arms_baseline["dice"], ref["dice"], atol=1e-6, equal_nan=True)  # the same f0
    table = notebook.method_table(per_case, ["baseline", *notebook.TTA_ARMS, "isl-mask-ema"])
    assert table.loc["baseline", "delta_vs_baseline"] is None or pd.isna(table.loc["baseline", "delta_vs_baseline"])
    assert (table["seconds_per_case"].drop("baseline") > 0).all()


@pytest.mark.slow
def test_nbval_checks_what_the_learner_reads(executed, tmp_path):
    """`pytest --nbval-lax` on the eight notebooks at the smoke profile, in the results folder of the papermill run
    above (the baseline, the experiment and the cached registrations are reused, not recomputed): every cell runs
    without error, and the cells marked `# NBVAL_CHECK_OUTPUT` print what tests/nbval/reference_outputs.json holds,
    up to tests/nbval/sanitize.cfg. Two pytest processes run side by side, one per chain of ``reproduce.STAGES``
    (the notebooks of the earlier stages join the second): the chains share no results, as in ``isl reproduce
    --jobs 2``."""
    import os
    import subprocess
    import sys

    import nbformat
    import nbval_support

    from isl_core.reproduce import STAGES

    refs = json.loads(nbval_support.REFERENCE.read_text(encoding="utf-8"))
    *earlier, last = STAGES
    groups = [list(last[0]), [n for stage in earlier for chain in stage for n in chain] + list(last[1])]
    assert sorted(n for g in groups for n in g) == [p.name[:2] for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        nb = nbval_support.with_references(path, refs)
        assert any(nbval_support.is_checked(c) for c in nb.cells), f"{path.name}: nbval checks no output"
        [group] = [i for i, g in enumerate(groups) if path.name[:2] in g]
        (tmp_path / str(group)).mkdir(exist_ok=True)
        nbformat.write(nb, tmp_path / str(group) / path.name)
    out = executed["out"]
    env = {**os.environ, "ISL_PROFILE": "smoke", "ISL_OUT_DIR": str(out / "work"),
           "ISL_DATA_DIR": str((out / "data").resolve())}
    t0 = time.perf_counter()
    procs = []
    for group in range(len(groups)):
        folder = tmp_path / str(group)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-sanitize-with", str(nbval_support.SANITIZE),
             "--nbval-cell-timeout", "1200", "-p", "no:cacheprovider", "-q", "--rootdir", str(folder),
             *sorted(str(p) for p in folder.glob("*.ipynb"))],
            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(proc, *proc.communicate()) for proc in procs]
    print(f"\npytest --nbval-lax (smoke, shared results folder, {len(procs)} at a time): "
          f"{time.perf_counter() - t0:.0f} s")
    for proc, stdout, stderr in results:
        assert proc.returncode == 0, stdout[-6000:] + stderr[-2000:]
        assert re.search(r"\d+ passed", stdout) and "failed" not in stdout


@pytest.mark.slow
def test_book_builds_from_the_executed_notebooks(executed, tmp_path):
    """`make book` on the real notebooks: every page linked, each with its figures (no second execution)."""
    from isl_core.course import build_book

    index = build_book(executed["out"], tmp_path / "book")
    html = index.read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f'href="notebooks/{path.stem}.html"' in html, f"index.html does not link {path.name}"
        page = (index.parent / "notebooks" / f"{path.stem}.html").read_text(encoding="utf-8")
        assert "<img" in page, path.name
        for machine_path in (str(executed["out"].resolve()), str(notebook.REPO.resolve()), str(Path.home())):
            assert machine_path not in page, f"{path.stem}.html shows the build machine's path {machine_path}"
        assert "injected-parameters" not in page, f"{path.stem}.html: papermill's injected cell is shown"
        assert re.search(r'<img [^>]*alt="[^"]{40,}"', page), f"{path.stem}.html: a figure without alt text"
