"""Every bad input to `isl` ends with one line `isl: error: ...` naming the file or option, exit status 2, no
traceback, and nothing outside the command's output folder touched.

The probes run in-process (`isl_core.cli.main(argv)`): a subprocess per probe would spend seconds importing
torch each time. Two real subprocesses at the end prove the wiring of the installed command.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_SIZE as TINY

from isl_core import cli
from isl_core.config import get_profile
from isl_core.outputs import record_tree


@dataclass
class Workspace:
    """A private copy of the cohort, a run folder and a prediction folder, which a probe may break."""

    root: Path
    ds: Path
    run: Path
    pred: Path
    out: Path

    def fmt(self, argv: list[str]) -> list[str]:
        names = {"ds": self.ds, "run": self.run, "pred": self.pred, "out": self.out, "root": self.root,
                 "img": self.ds / "imagesTr" / "synth_val_000.nii.gz"}
        return [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]


@pytest.fixture
def ws(tiny_cohort, tiny_run, tmp_path) -> Workspace:
    ds = shutil.copytree(tiny_cohort, tmp_path / "ds", copy_function=shutil.copy2)
    run = shutil.copytree(tiny_run, tmp_path / "run", copy_function=shutil.copy2)
    pred = tmp_path / "pred"
    pred.mkdir()
    for split_dir in ("labelsTr",):  # a perfect prediction of the validation case: its own label
        shutil.copy2(ds / split_dir / "synth_val_000.nii.gz", pred / "synth_val_000.nii.gz")
    return Workspace(tmp_path, Path(ds), Path(run), pred, tmp_path / "out")


# --------------------------------------------------------------------------------------------- breaking things
def _edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    doc = json.loads(path.read_text())
    new = fn(doc)
    path.write_text(json.dumps(doc if new is None else new))


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def _forged_header(path: Path, shape: tuple[int, ...]) -> None:
    """Rewrite the ``dim`` field of a .nii.gz header (bytes 40-55 of NIfTI-1) to claim ``shape``; the voxels stay
    the few that are there, as in a forged or damaged file."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[40:56] = np.array([len(shape), *shape, *([1] * (7 - len(shape)))], dtype="<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(data)))


def _set_image(ws: Workspace, rel: str, array: np.ndarray) -> None:
    path = ws.ds / rel
    _nifti(path, array, nib.load(str(path)).affine)


def _patch_srow(path: Path, row: int, values: list[float]) -> None:
    """Overwrite row ``row`` of the sform (``srow_x/y/z``: bytes 280-327 of a NIfTI-1 header) of a .nii.gz, as a
    damaged file may have it (nibabel itself refuses to save such an affine)."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[280 + 16 * row: 296 + 16 * row] = np.array(values, dtype="<f4").tobytes()
    path.write_bytes(gzip.compress(bytes(data)))


def _float64_claiming(ws: Workspace, rel: str, shape: tuple[int, int, int]) -> None:
    _set_image(ws, rel, np.zeros(TINY, np.float64))
    _forged_header(ws.ds / rel, shape)


def _user_file(ws: Workspace, name: str, copy_from: Path | None = None) -> None:
    ws.out.mkdir()
    if copy_from is None:
        (ws.out / name).write_text("the user's own\n")
    else:
        shutil.copy2(copy_from, ws.out / name)


def _empty_validation(ws: Workspace) -> None:
    _edit_json(ws.ds / "dataset.json", lambda d: d.update(validation=[]))


def _pickled_model(ws: Workspace) -> None:
    torch.save({"weights": io.StringIO("not a tensor")}, ws.run / "model.pt")


def _mismatched_model(ws: Workspace) -> None:
    torch.save({"conv.weight": torch.zeros(3)}, ws.run / "model.pt")


def _stale_checkpoint(ws: Workspace) -> None:
    """An out folder that `isl train ... --profile ci` accepts as its own, with an empty checkpoint.pt."""
    from isl_core.data import dataset_fingerprint, load_dataset
    from isl_core.outputs import record_tree
    from isl_core.segment import write_config

    ds = load_dataset(ws.ds)
    ws.out.mkdir()
    write_config(ws.out, get_profile("ci"), ds.num_classes, ds.labels, seed=0,
                 dataset_fingerprint=dataset_fingerprint(ds))
    (ws.out / "checkpoint.pt").write_bytes(b"")
    record_tree(ws.out)  # as if the kit had written both


# -------------------------------------------------------------------------------------------------- the probes
@dataclass
class Probe:
    id: str
    argv: list[str]
    names: list[str]  # fragments the error line must contain (the file or option, formatted like argv)
    setup: Callable[[Workspace], None] | None = None
    out: str = "{out}"  # the folder the command may write into (excluded from the untouched check)
    extra: dict = field(default_factory=dict)


def P(id, argv, names, setup=None, out="{out}"):  # noqa: N802 - a table row
    return Probe(id, argv.split(), names if isinstance(names, list) else [names], setup, out)


SYNTH = "data synth {out} --no-figure"
PROBES = [
    # option values, refused when the command line is parsed
    P("methods-unknown", "experiment {ds} --out {out} --methods baseline,isl-foo", ["--methods", "isl-foo"]),
    P("rounds-zero", "experiment {ds} --out {out} --rounds 0", "--rounds"),
    P("rounds-text", "experiment {ds} --out {out} --rounds two", "--rounds"),
    P("beta-one", "experiment {ds} --out {out} --beta 1", "--beta"),
    P("beta-negative", "experiment {ds} --out {out} --beta -0.1", "--beta"),
    P("beta-nan", "experiment {ds} --out {out} --beta nan", "--beta"),
    P("profile-unknown", "experiment {ds} --out {out} --profile huge", "--profile"),
    P("shift-inf", SYNTH + " --shift inf", "--shift"),
    P("shift-nan", SYNTH + " --shift nan", "--shift"),
    P("n-train-negative", SYNTH + " --n-train -2", "--n-train"),
    P("n-train-zero", SYNTH + " --n-train 0", "--n-train"),
    P("n-val-negative", SYNTH + " --n-val -1", "--n-val"),
    P("size-zero", SYNTH + " --size 0 0 0", "--size"),
    P("size-two-numbers", SYNTH + " --size 32 32", "--size"),
    P("seed-negative", "train {ds} --out {out} --seed -1", "--seed"),
    P("device-unknown", "train {ds} --out {out} --device gpu", "--device"),
    P("out-missing", "train {ds}", "--out"),
    P("split-unknown", "evaluate {pred} {ds} --split test", "--split"),
    P("command-unknown", "frobnicate {ds}", "frobnicate"),
    # devices
    P("train-cuda-without-gpu", "train {ds} --out {out} --device cuda", "--device cuda"),
    P("predict-cuda-without-gpu", "predict {run} {img} --out {out} --device cuda", "--device cuda"),
    # run folders
    P("predict-run-without-model", "predict {root}/nothing {img} --out {out}", "nothing"),
    P("predict-corrupt-config", "predict {run} {img} --out {out}", "{run}/config.json",
      lambda w: (w.run / "config.json").write_text('{"profile": {"name": "ci", ')),
    P("predict-config-not-a-profile", "predict {run} {img} --out {out}", "{run}/config.json",
      lambda w: (w.run / "config.json").write_text('{"profile": 3, "num_classes": 14}')),
    P("predict-empty-model", "predict {run} {img} --out {out}", "{run}/model.pt",
      lambda w: (w.run / "model.pt").write_bytes(b"")),
    P("predict-pickled-model", "predict {run} {img} --out {out}", ["{run}/model.pt", "not an isl-kit model"],
      _pickled_model),
    P("predict-other-network", "predict {run} {img} --out {out}", "{run}/model.pt", _mismatched_model),
    P("train-empty-checkpoint", "train {ds} --out {out} --profile ci", "{out}/checkpoint.pt", _stale_checkpoint),
    P("train-corrupt-config", "train {ds} --out {out}", "{out}/config.json",
      lambda w: (w.out.mkdir(), (w.out / "config.json").write_text("{"), record_tree(w.out))),
    P("reproduce-only-unknown", "reproduce --only 99 --out {out}", ["--only", "99"]),
    P("set-unknown-field", "experiment {ds} --out {out} --set refine.appearence=none", ["--set", "appearence"]),
    P("set-bad-value", "train {ds} --out {out} --set refine.appearance=mtach", ["--set", "mtach"]),
    P("set-unknown-stage", "experiment {ds} --out {out} --set registr.iterations=3", ["--set", "registr"]),
    P("set-no-value", "experiment {ds} --out {out} --set refine.beta", ["--set", "STAGE.FIELD=VALUE"]),
    # dataset.json
    P("dataset-missing", "train {root}/nowhere --out {out}", "nowhere/dataset.json"),
    P("dataset-json-list", "train {ds} --out {out}", "{ds}/dataset.json",
      lambda w: (w.ds / "dataset.json").write_text("[1, 2]")),
    P("dataset-json-not-utf8", "train {ds} --out {out}", ["{ds}/dataset.json", "UTF-8"],
      lambda w: (w.ds / "dataset.json").write_bytes(b'{"labels": "\xff\xfe"}')),
    P("dataset-json-broken", "train {ds} --out {out}", "{ds}/dataset.json",
      lambda w: (w.ds / "dataset.json").write_text('{"labels": ')),
    P("image-not-a-string", "train {ds} --out {out}", ["{ds}/dataset.json", "'image'"],
      lambda w: _edit_json(w.ds / "dataset.json", lambda d: d["training"][0].update(image=7))),
    P("training-not-a-list", "train {ds} --out {out}", ["{ds}/dataset.json", "'training'"],
      lambda w: _edit_json(w.ds / "dataset.json", lambda d: d.update(training="imagesTr"))),
    P("label-id-huge", "train {ds} --out {out}", ["{ds}/dataset.json", "100000"],
      lambda w: _edit_json(w.ds / "dataset.json", lambda d: d["labels"].update({"100000": "stray"}))),
    P("path-outside-folder", "train {ds} --out {out}", ["{ds}/dataset.json", "outside"],
      lambda w: _edit_json(w.ds / "dataset.json", lambda d: d["training"][0].update(image="../run/config.json"))),
    P("path-absolute", "train {ds} --out {out}", ["{ds}/dataset.json", "outside"],
      lambda w: _edit_json(w.ds / "dataset.json", lambda d: d["training"][0].update(image="/etc/hostname"))),
    P("forged-header", "train {ds} --out {out}", ["imagesTr/synth_train_001.nii.gz", "1000"],
      lambda w: _forged_header(w.ds / "imagesTr" / "synth_train_001.nii.gz", (1000, 1000, 1000))),
    P("image-2d", "train {ds} --out {out}", "imagesTr/synth_train_000.nii.gz",
      lambda w: _set_image(w, "imagesTr/synth_train_000.nii.gz", np.zeros((32, 32), np.int16))),
    P("image-nan", "train {ds} --out {out}", ["imagesTr/synth_train_000.nii.gz", "NaN"],
      lambda w: _set_image(w, "imagesTr/synth_train_000.nii.gz", np.full(TINY, np.nan, np.float32))),
    # predict: one file is checked as strictly as a dataset case
    P("predict-file-missing", "predict {run} {root}/no.nii.gz --out {out}", "no.nii.gz"),
    P("predict-file-nan", "predict {run} {root}/nan.nii.gz --out {out}", ["nan.nii.gz", "NaN"],
      lambda w: _nifti(w.root / "nan.nii.gz", np.full(TINY, np.nan, np.float32))),
    P("predict-file-2d", "predict {run} {root}/flat.nii.gz --out {out}", ["flat.nii.gz", "3D"],
      lambda w: _nifti(w.root / "flat.nii.gz", np.zeros((32, 32), np.float32))),
    P("predict-file-not-nifti", "predict {run} {root}/notes.nii.gz --out {out}", "notes.nii.gz",
      lambda w: (w.root / "notes.nii.gz").write_text("hello")),
    P("predict-unstamped-folder", "predict {run} {img} --out {pred}", ["synth_val_000.nii.gz", "did not write"],
      out="{root}/none"),
    # evaluate
    P("evaluate-corrupt-prediction", "evaluate {pred} {ds} --out {out}", "{pred}/synth_val_000.nii.gz",
      lambda w: (w.pred / "synth_val_000.nii.gz").write_bytes(b"\x1f\x8b garbage")),
    P("evaluate-missing-prediction", "evaluate {pred} {ds} --out {out}", "{pred}/synth_val_000.nii.gz",
      lambda w: (w.pred / "synth_val_000.nii.gz").unlink()),
    P("evaluate-probabilities", "evaluate {pred} {ds} --out {out}", "{pred}/synth_val_000.nii.gz",
      lambda w: _nifti(w.pred / "synth_val_000.nii.gz", np.full(TINY, 0.5, np.float32),
                       nib.load(str(w.ds / "labelsTr" / "synth_val_000.nii.gz")).affine)),
    P("evaluate-other-grid", "evaluate {pred} {ds} --out {out}", ["{pred}/synth_val_000.nii.gz",
                                                                   "labelsTr/synth_val_000.nii.gz"],
      lambda w: _nifti(w.pred / "synth_val_000.nii.gz", np.zeros((16, 16, 12), np.uint8))),
    P("evaluate-unknown-label", "evaluate {pred} {ds} --out {out}", ["{pred}/synth_val_000.nii.gz", "99"],
      lambda w: _nifti(w.pred / "synth_val_000.nii.gz", np.full(TINY, 99, np.uint8),
                       nib.load(str(w.ds / "labelsTr" / "synth_val_000.nii.gz")).affine)),
    P("evaluate-no-validation-cases", "evaluate {pred} {ds} --out {out}", ["{ds}/dataset.json", "validation"],
      _empty_validation),
    P("evaluate-pred-not-a-folder", "evaluate {root}/nothing {ds} --out {out}", "nothing"),
    # output folders
    P("synth-out-is-a-file", "data synth {root}/file.txt --no-figure", "file.txt",
      lambda w: (w.root / "file.txt").write_text("mine"), out="{root}/none"),
    P("synth-into-user-folder", "data synth {root}/mine --no-figure --force", ["mine/notes.txt", "did not write"],
      lambda w: ((w.root / "mine").mkdir(), (w.root / "mine" / "notes.txt").write_text("mine")), out="{root}/none"),
    P("train-out-is-a-file", "train {ds} --out {root}/file.txt", ["--out", "file.txt"],
      lambda w: (w.root / "file.txt").write_text("mine"), out="{root}/none"),
    P("predict-out-is-a-file", "predict {run} {img} --out {root}/file.txt", ["--out", "file.txt"],
      lambda w: (w.root / "file.txt").write_text("mine"), out="{root}/none"),
    P("experiment-out-is-a-file", "experiment {ds} --out {root}/file.txt", ["--out", "file.txt"],
      lambda w: (w.root / "file.txt").write_text("mine"), out="{root}/none"),
    # output folders hold only the kit's files: anything else is refused, naming it, before any work
    P("predict-into-dataset-labels", "predict {run} {ds} --out {ds}/labelsTr --force",
      ["{ds}/labelsTr", "inside the dataset folder"], out="{root}/none"),
    P("predict-out-holds-dataset", "predict {run} {ds} --out {root}", ["--out {root}", "holds the dataset"],
      out="{root}/none"),
    P("experiment-into-dataset", "experiment {ds} --out {ds}/results --profile ci", ["{ds}/results", "dataset"],
      out="{root}/none"),
    P("evaluate-into-dataset", "evaluate {pred} {ds} --out {ds}", ["--out {ds}", "dataset"], out="{root}/none"),
    P("train-over-user-file", "train {ds} --out {out} --profile ci", ["{out}/history.json", "did not write"],
      lambda w: _user_file(w, "history.json"), out="{root}/none"),
    P("experiment-over-user-file", "experiment {ds} --out {out} --profile ci --model {run}",
      ["{out}/summary.json", "did not write"], lambda w: _user_file(w, "summary.json"), out="{root}/none"),
    P("train-copied-model", "train {ds} --out {out} --profile ci", ["{out}/model.pt", "did not write"],
      lambda w: _user_file(w, "model.pt", w.run / "model.pt"), out="{root}/none"),
    P("evaluate-over-user-table", "evaluate {pred} {ds}", ["{pred}/per_case.csv", "did not write"],
      lambda w: (w.pred / "per_case.csv").write_text("mine\n"), out="{root}/none"),
    # each setting has one entry point, and every value is checked where it is set
    P("beta-and-set-disagree", "experiment {ds} --out {out} --beta 0.5 --set refine.beta=0.7",
      ["--beta 0.5", "refine.beta=0.7"]),
    P("rounds-and-set-disagree", "experiment {ds} --out {out} --rounds 2 --set refine.rounds=3",
      ["--rounds 2", "refine.rounds=3"]),
    P("set-twice-disagree", "train {ds} --out {out} --set segment.lr=0.1 --set segment.lr=0.2", ["segment.lr"]),
    P("set-spacing-two-numbers", "train {ds} --out {out} --set data.spacing=[8,8]", ["--set", "spacing", "3 items"]),
    P("set-rounds-fraction", "experiment {ds} --out {out} --set refine.rounds=2.5", ["--set", "rounds", "integer"]),
    P("set-spacing-text", "train {ds} --out {out} --set data.spacing=abc", ["--set", "spacing", "'abc'"]),
    P("set-shape-zero", "train {ds} --out {out} --set data.shape=[0,0,0]", ["--set", "shape", ">= 1"]),
    P("set-channels-empty", "train {ds} --out {out} --set segment.channels=[]", ["--set", "channels"]),
    P("set-strides-do-not-fit", "train {ds} --out {out} --profile ci --set segment.strides=[2,2,2]",
      ["--set", "strides"]),
    # files that passed the first step's checks
    P("labels-one-id-twice", "train {ds} --out {out}", ["{ds}/dataset.json", "'01'"],
      lambda w: _edit_json(w.ds / "dataset.json", lambda d: d["labels"].update({"01": "another spleen"}))),
    P("image-overflows-float32", "train {ds} --out {out}", ["imagesTr/synth_train_000.nii.gz", "overflow"],
      lambda w: _set_image(w, "imagesTr/synth_train_000.nii.gz", np.full(TINY, 1000.0) * 1e37)),
    P("affine-singular", "train {ds} --out {out}", ["imagesTr/synth_train_000.nii.gz", "singular"],
      lambda w: _patch_srow(w.ds / "imagesTr" / "synth_train_000.nii.gz", 1, [0, 0, 0, -186])),
    P("affine-nan", "train {ds} --out {out}", ["imagesTr/synth_train_000.nii.gz", "NaN"],
      lambda w: _patch_srow(w.ds / "imagesTr" / "synth_train_000.nii.gz", 0, [np.nan, 0, 0, -186])),
    P("header-too-many-bytes", "train {ds} --out {out}", ["imagesTr/synth_train_000.nii.gz", "bytes"],
      lambda w: _float64_claiming(w, "imagesTr/synth_train_000.nii.gz", (810, 810, 810))),
]


def _snapshot(root: Path, exclude: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (outside ``exclude``) with its size and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p == exclude or exclude in p.parents or not p.is_file():
            continue
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc: int, err: str, names: list[str]) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("isl: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert "weights_only=False" not in err  # never suggest loading untrusted pickles
    if os.environ.get("ISL_SHOW_ERRORS"):
        print(errors[0], file=sys.__stdout__)
    return errors[0]


def test_there_are_at_least_forty_probes():
    assert len(PROBES) >= 40 and len({p.id for p in PROBES}) == len(PROBES)


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_bad_input_gives_one_line_error(probe: Probe, ws: Workspace, capsys):
    if probe.setup:
        probe.setup(ws)
    out = Path(ws.fmt([probe.out])[0])
    before = _snapshot(ws.root, out)
    rc, err = _run(ws.fmt(probe.argv), capsys)
    _assert_one_line_error(rc, err, ws.fmt(probe.names))
    assert _snapshot(ws.root, out) == before, "a file outside --out was touched"


# ---------------------------------------------------------------------------------- the file system says no
def _refuse_writes_under(monkeypatch, folder: Path, err: int) -> None:
    """Make ``folder`` unwritable as a read-only mount or a full disk would (the tests may run as root, whom
    chmod does not stop): creating a folder or a temporary file under it raises ``OSError(err)``."""
    import pathlib

    folder = folder.resolve()
    real_mkdir, real_mkstemp = pathlib.Path.mkdir, tempfile.mkstemp

    def under(path) -> bool:
        p = Path(path).resolve()
        return p == folder or folder in p.parents

    def mkdir(self, *args, **kwargs):
        if under(self):
            raise OSError(err, os.strerror(err), str(self))
        return real_mkdir(self, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own name
        if dir is not None and under(dir):
            raise OSError(err, os.strerror(err), str(Path(dir) / "tmpfile"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


UNWRITABLE = [
    ("synth", "data synth {out} --no-figure --size 16 16 12 --n-train 1 --n-val 0"),
    ("train", "train {ds} --out {out} --profile ci"),
    ("predict", "predict {run} {img} --out {out}"),
    ("evaluate", "evaluate {pred} {ds} --out {out}"),
    ("experiment", "experiment {ds} --out {out} --profile ci --methods baseline --model {run}"),
    ("show", "data show {ds} --out {out}/cohort.png"),
    ("reproduce", "reproduce --out {out} --only 00 --profile ci"),
]


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.ENOSPC], ids=["read-only", "denied", "disk-full"])
@pytest.mark.parametrize("command", UNWRITABLE, ids=[c[0] for c in UNWRITABLE])
def test_unwritable_out_is_one_line_naming_it(command, err, ws: Workspace, capsys, monkeypatch):
    _refuse_writes_under(monkeypatch, ws.out, err)
    before = _snapshot(ws.root, ws.out)
    rc, line = _run(ws.fmt(command[1].split()), capsys)
    msg = _assert_one_line_error(rc, line, [str(ws.out)])
    assert {errno.EROFS: "read-only", errno.EACCES: "permission", errno.ENOSPC: "space"}[err] in msg.lower()
    assert _snapshot(ws.root, ws.out) == before


# ---------------------------------------------------------------------------------- debug and internal errors
def test_debug_flag_and_variable_show_the_traceback(ws: Workspace, capsys, monkeypatch):
    argv = ws.fmt("predict {root}/nothing {img} --out {out}".split())
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", *argv])
    monkeypatch.setenv("ISL_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


def test_a_bug_is_one_line_internal_error_with_status_1(ws: Workspace, capsys, monkeypatch):
    from isl_core import commands

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(commands, "evaluate", broken)
    rc, err = _run(ws.fmt("evaluate {pred} {ds}".split()), capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("isl: internal error: ZeroDivisionError")
    assert "--debug" in err


# ------------------------------------------------------------------------------------ the installed command
@pytest.mark.parametrize("argv, name", [(["data", "synth", "{root}/x", "--size", "0", "0", "0"], "--size"),
                                        (["predict", "{root}/nothing", "{img}", "--out", "{out}"], "nothing")])
def test_real_process_exit_status_and_stderr(argv, name, ws: Workspace):
    proc = subprocess.run([sys.executable, "-m", "isl_core.cli", *ws.fmt(argv)], capture_output=True, text=True,
                          timeout=120)
    _assert_one_line_error(proc.returncode, proc.stderr, [name])
    assert not (ws.root / "x").exists() and not ws.out.exists()
