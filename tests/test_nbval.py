"""nbval's part of the notebook tests, cheaply: the references cover every marked cell, the sanitiser masks what
differs between machines, and nbval (`--nbval-lax`) fails a marked cell whose output changed.

The numbered notebooks themselves run under nbval in tests/test_notebooks.py (slow), after the papermill run."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import nbval_support
import pytest

from isl_core.reproduce import notebooks


def test_every_notebook_has_checked_outputs_with_references():
    refs = json.loads(nbval_support.REFERENCE.read_text(encoding="utf-8"))
    for path in notebooks():
        nb = nbval_support.with_references(path, refs)  # raises on a marked cell without reference
        checked = [c for c in nb.cells if nbval_support.is_checked(c)]
        assert checked, f"{path.name}: no cell marked # NBVAL_CHECK_OUTPUT"
        assert all(c.outputs for c in checked), f"{path.name}: a marked cell whose reference prints nothing"
        verdicts = [c for c in checked if "check" in c.metadata.get("tags", [])]
        assert verdicts and all("".join(o.get("text", "")).startswith("correct: ") for c in verdicts
                                for o in c.outputs), f"{path.name}: the check cell's reference is not a pass"


def test_a_reference_for_an_unknown_cell_is_refused(tmp_path):
    with pytest.raises(KeyError, match="no reference output for the marked cell"):
        nbval_support.with_references(notebooks()[0], {})


def _nbval(tmp_path, printed: str, reference: str) -> subprocess.CompletedProcess:
    cell = nbformat.v4.new_code_cell(f"# NBVAL_CHECK_OUTPUT\nprint({printed!r})", execution_count=1,
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text=reference + "\n")])
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell("print('not compared')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-sanitize-with",
                           str(nbval_support.SANITIZE), "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                           str(tmp_path / "tiny.ipynb")], cwd=tmp_path, capture_output=True, text=True)


def test_nbval_masks_paths_and_times_and_catches_a_changed_output(tmp_path):
    same = _nbval(tmp_path, "results in /home/someone/run/work after 12.5 s",
                  "results in /tmp/pytest-of-ci/run0/work after 3 s")
    assert same.returncode == 0, same.stdout[-3000:]
    changed = _nbval(tmp_path, "correct: the window maps -175 HU to 0", "correct: the window maps -175 HU to 1")
    assert changed.returncode != 0 and "failed" in changed.stdout, changed.stdout[-3000:]
