"""nbval's references: what the cells marked ``# NBVAL_CHECK_OUTPUT`` print at the smoke profile.

The committed notebooks carry no outputs, so the reference outputs live in ``tests/nbval/reference_outputs.json``
(notebook name -> cell id -> outputs). ``with_references`` puts them into a copy of a notebook for
``pytest --nbval-lax``, which then runs every cell and compares the marked ones (after ``tests/nbval/sanitize.cfg``).
Refresh the references after changing what such a cell prints, from a run of the notebooks at the smoke profile:

    isl reproduce --profile smoke --out RUN && python tests/nbval_support.py RUN
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).parent / "nbval"
REFERENCE = HERE / "reference_outputs.json"
SANITIZE = HERE / "sanitize.cfg"
MARKER = "# NBVAL_CHECK_OUTPUT"


def is_checked(cell) -> bool:
    """A code cell that carries nbval's marker on a line of its own (the way nbval itself reads it)."""
    return cell.cell_type == "code" and any(line.strip() == MARKER for line in cell.source.splitlines())


def _printed(outputs) -> list[dict]:
    """The outputs nbval compares, without execution counts: text only (the marked cells print, they draw nothing)."""
    kept = []
    for out in outputs:
        if out.get("output_type") == "stream":
            text = "".join(out["text"])
            if kept and kept[-1]["output_type"] == "stream" and kept[-1]["name"] == out["name"]:
                kept[-1]["text"] += text  # one print can arrive in pieces; nbval joins them too
            else:
                kept.append({"output_type": "stream", "name": out["name"], "text": text})
        elif out.get("output_type") in ("execute_result", "display_data"):
            kept.append({"output_type": out["output_type"], "metadata": {},
                         "data": {k: v for k, v in out["data"].items() if k.startswith("text/")},
                         **({"execution_count": None} if out["output_type"] == "execute_result" else {})})
    return kept


def references_from_run(executed_dir: Path, sources: list[Path]) -> dict[str, dict[str, list[dict]]]:
    """{notebook name: {cell id: outputs}}: the cells marked in each source notebook, with what they printed in
    the same notebook executed by ``isl reproduce`` (papermill keeps the cell ids)."""
    refs = {}
    for source in sources:
        marked = {c.id for c in nbformat.read(source, as_version=4).cells if is_checked(c)}
        executed = {c.id: c for c in nbformat.read(executed_dir / source.name, as_version=4).cells}
        missing = marked - set(executed)
        if missing:
            raise KeyError(f"{executed_dir / source.name}: no cell {sorted(missing)}; run the notebooks again")
        refs[source.name] = {i: _printed(executed[i].outputs) for i in sorted(marked)}
    return refs


def with_references(source: Path, refs: dict[str, dict[str, list[dict]]]):
    """A copy of the notebook ``source`` whose marked cells carry their reference outputs."""
    nb = nbformat.read(source, as_version=4)
    mine = refs.get(source.name, {})
    for cell in nb.cells:
        if is_checked(cell):
            if cell.id not in mine:
                raise KeyError(f"{source.name}: no reference output for the marked cell {cell.id}; refresh "
                               "tests/nbval/reference_outputs.json (see tests/nbval_support.py)")
            cell.outputs = [nbformat.from_dict(o) for o in mine[cell.id]]
            cell.execution_count = 1
    return nb


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from isl_core.reproduce import notebooks

    run = Path(argv[0])
    refs = references_from_run(run / "notebooks", notebooks())
    REFERENCE.write_text(json.dumps(refs, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{REFERENCE}: {sum(len(v) for v in refs.values())} cells of {len(refs)} notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
