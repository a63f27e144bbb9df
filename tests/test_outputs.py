"""The rules of the second reliability step, tested as rules on cases beyond the probes of test_bad_inputs.py:
manifests (the kit overwrites and deletes only its own, unchanged files), one command per output folder at a time,
settings checked where they are set, the environment's switch words, error lines after progress bars, and a
training resumed from a checkpoint equal to an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from isl_core import cli, outputs
from isl_core.config import get_profile, parse_setting, profile_from_settings
from isl_core.runtime import UserError, env_flag, write_text


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------------- manifests
def test_the_kit_replaces_and_deletes_only_its_own_unchanged_files(tmp_path):
    out = tmp_path / "out"
    with outputs.claim(out):
        write_text(out / "a.txt", "the kit's")
        write_text(out / "sub" / "b.txt", "the kit's too")
    assert outputs.owned(out / "a.txt") and outputs.owned(out / "sub" / "b.txt")
    write_text(out / "a.txt", "rewritten by the kit")  # the kit's file: replaced, and recorded again
    assert outputs.owned(out / "a.txt")
    (out / "sub" / "b.txt").write_text("edited by the user")
    assert not outputs.owned(out / "sub" / "b.txt")
    with pytest.raises(outputs.OutputFolderError, match="sub/b.txt"):
        write_text(out / "sub" / "b.txt", "the kit again")
    with pytest.raises(outputs.OutputFolderError, match="sub/b.txt"):
        outputs.remove(out / "sub" / "b.txt")
    assert (out / "sub" / "b.txt").read_text() == "edited by the user"
    with pytest.raises(outputs.OutputFolderError, match="sub/b.txt"), outputs.claim(out):
        pass
    outputs.remove(out / "a.txt")
    assert not (out / "a.txt").exists()


def test_a_nested_output_folder_keeps_its_own_manifest(tmp_path):
    outer, inner = tmp_path / "exp", tmp_path / "exp" / "preds"
    with outputs.claim(outer):
        write_text(outer / "summary.json", "{}")
    with outputs.claim(inner):
        write_text(inner / "x.nii.gz", "map")
    assert outputs.manifest_root(inner / "x.nii.gz") == inner
    assert outputs.foreign_files(outer) == []  # the inner files are the kit's by the inner manifest
    (inner / "notes.txt").write_text("mine")
    assert outputs.foreign_files(outer) == [inner / "notes.txt"]


def test_outside_a_claimed_folder_nothing_is_recorded_or_refused(tmp_path):
    (tmp_path / "x.txt").write_text("anybody's")
    write_text(tmp_path / "x.txt", "replaced")  # the library's writers, used on their own, behave as before
    assert not (tmp_path / outputs.MANIFEST).exists()


def test_stale_temporaries_are_removed_and_look_alikes_kept(tmp_path):
    out = tmp_path / "out"
    with outputs.claim(out):
        write_text(out / "a.nii.gz", "x")
    stale = [out / ".isl-tmp.a.nii.gz.k2j4_9zq.nii.gz", out / ".isl-tmp.per_case.csv.abcdefgh.csv",
             out / ".isl-tmp.model.pt.0123abcd.pt"]
    for p in stale:
        p.write_bytes(b"half")
    kept = [out / ".isl-tmp.a.nii.gz.short.nii.gz", out / ".notes", out / "a.nii.gz.abcdefgh.nii.gz",
            out / ".notes.20250101", out / ".a.nii.gz.k2j4_9zq.nii.gz"]
    for p in kept:
        p.write_bytes(b"mine")
    assert all(outputs.is_temporary(p) for p in stale) and not any(outputs.is_temporary(p) for p in kept)
    with pytest.raises(outputs.OutputFolderError), outputs.claim(out):  # the look-alikes are the user's
        pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_resumed_synth_removes_the_temporary_its_killed_run_left(tmp_path, capsys):
    from isl_core.runtime import read_json, write_json

    ds = tmp_path / "ds"
    argv = ["data", "synth", ds, "--no-figure", "--n-train", "2", "--n-val", "0", "--size", "16", "16", "12"]
    assert _run(argv, capsys)[0] == 0
    # the state a SIGKILL while writing the second image leaves: the partial stamp, a truncated hidden temporary
    write_json(ds / "phantom_spec.partial.json", read_json(ds / "phantom_spec.json", "stamp"))
    outputs.remove(ds / "phantom_spec.json")
    image = ds / "imagesTr" / "synth_train_001.nii.gz"
    outputs.remove(image)
    stale = image.parent / ".isl-tmp.synth_train_001.nii.gz.q1w2e3r4.nii.gz"
    stale.write_bytes(b"\x1f\x8b truncated")
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    assert not stale.exists() and image.is_file() and (ds / "phantom_spec.json").is_file()
    assert outputs.foreign_files(ds) == []


# ------------------------------------------------------------------------------------------------------- locks
@pytest.mark.parametrize("command", [
    "train {ds} --out {out} --profile ci",
    "predict {run} {ds} --out {out}",
    "evaluate {pred} {ds} --out {out}",
    "experiment {ds} --out {out} --profile ci --model {run} --methods baseline",
    "data synth {out} --no-figure",
], ids=["train", "predict", "evaluate", "experiment", "synth"])
def test_a_second_command_into_one_folder_is_refused(command, tiny_cohort, tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy2(tiny_cohort / "labelsTr" / "synth_val_000.nii.gz", pred / "synth_val_000.nii.gz")
    argv = command.format(ds=tiny_cohort, run=tiny_run, out=out, pred=pred).split()
    with outputs.lock(out, "isl command"):  # held as by a run in another process (flock excludes either way)
        rc, _, err = _run(argv, capsys)
        assert rc == 2 and err.strip().count("\n") == 0, err
        assert f"is writing into {out}" in err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------- predict and evaluate
def test_predict_redoes_a_case_whose_image_changed(tiny_cohort, tiny_run, tmp_path, capsys):
    ds = shutil.copytree(tiny_cohort, tmp_path / "ds")
    out = tmp_path / "pred"
    img = ds / "imagesTr" / "synth_val_000.nii.gz"
    assert _run(["predict", tiny_run, img, "--out", out], capsys)[0] == 0
    rc, said, _ = _run(["predict", tiny_run, img, "--out", out], capsys)
    assert rc == 0 and "skip" in said
    shutil.copy2(ds / "imagesTr" / "synth_train_000.nii.gz", img)  # another image under the same name
    rc, said, _ = _run(["predict", tiny_run, img, "--out", out], capsys)
    assert rc == 0 and "wrote" in said and "skip" not in said
    stamp = json.loads((out / "isl_predictions.json").read_text())
    assert stamp["inputs"]["synth_val_000"] == outputs.sha256(img)


def test_evaluate_without_vs_leaves_no_older_paired_table(tiny_cohort, tmp_path, capsys):
    pred, other, out = tmp_path / "pred", tmp_path / "other", tmp_path / "eval"
    for folder in (pred, other):
        folder.mkdir()
        shutil.copy2(tiny_cohort / "labelsTr" / "synth_val_000.nii.gz", folder / "synth_val_000.nii.gz")
    assert _run(["evaluate", pred, tiny_cohort, "--vs", other, "--out", out], capsys)[0] == 0
    assert (out / "paired_tests.csv").is_file()
    assert _run(["evaluate", pred, tiny_cohort, "--out", out], capsys)[0] == 0
    assert (out / "per_case.csv").is_file() and not (out / "paired_tests.csv").exists()


# ---------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("text, words", [
    ("segment.max_steps=1.5", "integer"), ("segment.max_steps=true", "integer"), ("register.levels=0", ">= 1"),
    ("data.spacing=[8,8,0]", "> 0"), ("data.spacing=[8,8,8,8]", "3 items"), ("data.shape=[48,48,32.5]", "integer"),
    ("data.crop_foreground=1", "true or false"), ("data.modality=5", "text"), ("segment.patch_size=48", "list"),
    ("refine.beta=NaN", "finite"), ("refine.augment_gamma=[1.25]", "2 items"), ("register.lr=-1", ">= 0"),
    ("segment.strides=[]", "one or more"), ("fusion.kernel=\"5\"", "integer"),
])
def test_every_value_is_checked_for_type_length_and_range_when_parsed(text, words):
    field = text.split("=")[0].split(".")[1]
    with pytest.raises(ValueError, match=field) as e:
        parse_setting(text)
    assert words in str(e.value)


@pytest.mark.parametrize("stage, values, words", [
    ("data", {"ct_window": (250.0, -175.0)}, "lower bound"),
    ("refine", {"augment_scale": (1.1, 0.9)}, "lower bound"),
    ("segment", {"channels": (8, 16)}, "strides"),
])
def test_settings_that_contradict_each_other_are_refused(stage, values, words):
    with pytest.raises(ValueError, match=words):
        get_profile("ci", **{stage: values})


def test_a_parsed_value_becomes_the_fields_type_and_lands_in_the_profile():
    assert parse_setting("data.spacing=[6,6,8]") == ("data", "spacing", (6, 6, 8))
    p = profile_from_settings("ci", [parse_setting("data.spacing=[6,6,8]"), parse_setting("refine.beta=0.5")],
                              {"--beta": ("refine", "beta", 0.5), "--rounds": None})
    assert p.data.spacing == (6, 6, 8) and p.refine.beta == 0.5
    with pytest.raises(ValueError, match="must be an integer"):
        p.refine.rounds = 2.5  # assignment is checked as much as construction


def test_one_setting_has_one_entry_point():
    with pytest.raises(ValueError, match=r"--set refine.rounds=2 and --rounds 3"):
        profile_from_settings("ci", [("refine", "rounds", 2)], {"--rounds": ("refine", "rounds", 3)})
    with pytest.raises(ValueError, match="register.iterations"):
        profile_from_settings("ci", [("register", "iterations", 3), ("register", "iterations", 4)])


# ------------------------------------------------------------------------------------------ environment switches
@pytest.mark.parametrize("word, value", [("1", True), ("TRUE", True), ("Yes", True), ("on", True), ("0", False),
                                         ("false", False), ("NO", False), ("Off", False), ("", False)])
def test_switch_words_in_any_case(word, value, monkeypatch):
    monkeypatch.setenv("ISL_SOME_SWITCH", word)
    assert env_flag("ISL_SOME_SWITCH") is value


@pytest.mark.parametrize("word", ["2", "maybe", "enabled", "t", "y", "-1"])
def test_other_words_are_refused_naming_the_variable(word, monkeypatch):
    monkeypatch.setenv("ISL_SOME_SWITCH", word)
    with pytest.raises(UserError, match=f"ISL_SOME_SWITCH={word!r}"):
        env_flag("ISL_SOME_SWITCH")


def _outside_path(ds: Path) -> None:
    doc = json.loads((ds / "dataset.json").read_text())
    doc["training"][0]["image"] = "../elsewhere.nii.gz"
    (ds / "dataset.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("word, confined", [("false", True), ("OFF", True), ("no", True), ("0", True),
                                            ("maybe", None), ("yes", False)])
def test_allow_external_paths_takes_only_switch_words(word, confined, tiny_cohort, tmp_path, capsys, monkeypatch):
    ds = shutil.copytree(tiny_cohort, tmp_path / "ds")
    shutil.copy2(ds / "imagesTr" / "synth_train_000.nii.gz", tmp_path / "elsewhere.nii.gz")
    _outside_path(ds)
    monkeypatch.setenv("ISL_ALLOW_EXTERNAL_PATHS", word)
    rc, _, err = _run(["data", "show", ds, "--out", tmp_path / "fig.png"], capsys)
    if confined is None:
        assert rc == 2 and "ISL_ALLOW_EXTERNAL_PATHS='maybe'" in _last_line(err)
    elif confined:
        assert rc == 2 and "leads outside" in _last_line(err)
    else:
        assert rc == 0, err


@pytest.mark.parametrize("word, traceback", [("false", False), ("no", False), ("1", True), ("On", True)])
def test_isl_debug_takes_switch_words(word, traceback, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ISL_DEBUG", word)
    argv = ["predict", tmp_path / "nothing", tmp_path / "x.nii.gz", "--out", tmp_path / "out"]
    if traceback:
        with pytest.raises(FileNotFoundError):
            cli.main([str(a) for a in argv])
    else:
        rc, _, err = _run(argv, capsys)
        assert rc == 2 and err.count("\n") == 1


def test_a_bad_isl_debug_word_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ISL_DEBUG", "sometimes")
    rc, _, err = _run(["data", "show", tmp_path], capsys)
    assert rc == 2 and err.startswith("isl: error: environment variable ISL_DEBUG") and err.count("\n") == 1


def test_errors_are_mapped_by_class():
    from data_download.errors import FetchError

    class DatasetError(Exception):  # the name of a user error, but not the class: a bug
        pass

    assert cli.describe_error(FetchError("x"))[0] == 2
    assert cli.describe_error(outputs.OutputFolderError("x"))[0] == 2
    assert cli.describe_error(DatasetError("x"))[0] == 1


# -------------------------------------------------------------------------------------------------- progress bars
@pytest.mark.parametrize("raised, last", [(UserError("the disk left"), "isl: error: the disk left"),
                                          (KeyboardInterrupt(), "isl: interrupted")])
def test_the_error_line_comes_after_the_open_progress_bars(raised, last, tiny_cohort, tmp_path, capsys,
                                                           monkeypatch):
    from isl_core import segment

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(segment, "train_step", fail)
    rc, _, err = _run(["train", tiny_cohort, "--out", tmp_path / "run", "--profile", "ci"], capsys)
    assert "train f0" in err  # the bar was drawn
    assert rc in (2, 130) and _last_line(err).startswith(last)
    # what a terminal shows last: the text after the last carriage return of the last line, the bar erased before it
    segments = err.rstrip("\n").rsplit("\n", 1)[-1].split("\r")
    assert segments[-1].startswith(last) and all(not seg.strip() for seg in segments[-2:-1]), segments


# ---------------------------------------------------------------------------------------------- resumed training
class _Killed(Exception):
    pass


def test_training_resumed_from_a_checkpoint_equals_the_uninterrupted_one(tiny_cohort, tmp_path):
    from isl_core.data import load_cases, load_dataset
    from isl_core.segment import CHECKPOINT, train_segmenter

    ds = load_dataset(tiny_cohort)
    # more patches than cases per pass, so the stream crosses a pass boundary and resumes inside one
    profile = get_profile("ci", segment={"max_steps": 5, "val_every": 5, "checkpoint_every": 3, "batch_size": 1,
                                         "patch_size": (16, 16, 16), "channels": (4, 8, 8)})
    cases = load_cases(ds.training, profile.data)
    assert len(cases) < profile.segment.max_steps
    whole, _ = train_segmenter(cases, profile, ds.num_classes, ds.labels, out=tmp_path / "a", device="cpu",
                               progress=False)

    def kill(step: int) -> None:
        if step == 4:  # after the checkpoint of step 3, inside the second pass over the cases: step 4 is redone
            raise _Killed

    with pytest.raises(_Killed):
        train_segmenter(cases, profile, ds.num_classes, ds.labels, out=tmp_path / "b", device="cpu", progress=False,
                        on_step=kill)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["step"] == 3
    resumed, state = train_segmenter(cases, profile, ds.num_classes, ds.labels, out=tmp_path / "b", device="cpu",
                                     progress=False)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state.resumed_at == [{"step": 3, "exact": True}]
    assert json.loads((tmp_path / "b" / "history.json").read_text())["resumed_at"] == [{"step": 3, "exact": True}]
    assert len(state.history) == 5 and not np.isnan([h["loss"] for h in state.history]).any()
