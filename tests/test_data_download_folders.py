"""The dataset folder ``--out`` and what lies next to it: nothing a user made is replaced, a killed run's
temporaries are cleaned up, and a read-only folder or a full disk ends in one ``isl: error:`` line."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import fabricate as fab
import nibabel
import pytest

from data_download import extract
from data_download.dataset_folder import MARKER, out_lock, temp_prefix
from data_download.errors import FetchError
from data_download.fetch import FetchOptions, fetch
from isl_core.cli import main as isl_main
from isl_core.runtime import write_text


@pytest.fixture(scope="module")
def hanseg_zip(tmp_path_factory) -> Path:
    return fab.make_hanseg_zip(tmp_path_factory.mktemp("a") / "HaN-Seg.zip", n_cases=3)


@pytest.fixture
def server(hanseg_zip):
    srv = fab.ArchiveServer().start()
    srv.add("HaN-Seg.zip", hanseg_zip)
    yield srv
    srv.stop()


def fetch_args(out: Path, server, hanseg_zip: Path, *extra: str) -> list[str]:
    return ["data", "fetch", "hanseg", "--out", str(out), "--url", server.url("HaN-Seg.zip"),
            "--sha256", fab.sha256_of(hanseg_zip), "--folds", "3", *extra]


def gets(server) -> int:
    return len([r for r in server.requests if r[0] == "GET"])


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isl: error: "), err
    assert "Traceback" not in err
    return lines[0]


def no_temporaries(parent: Path, out: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_the_kit_did_not_make_survives_force(server, hanseg_zip, tmp_path, capsys, force):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "src" / "main.py").write_text("print('mine')\n")
    before = snapshot(out)
    assert isl_main(fetch_args(out, server, hanseg_zip, *(["--force"] if force else []))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "did not make" in line and "--force" not in line
    assert snapshot(out) == before
    assert gets(server) == 0  # refused before any download
    assert no_temporaries(tmp_path, out)


def test_force_rebuilds_a_kit_folder_but_not_the_files_a_user_added_to_it(server, hanseg_zip, tmp_path, capsys):
    out = tmp_path / "hanseg"
    assert isl_main(fetch_args(out, server, hanseg_zip)) == 0
    write_text(out / "cohort.png", "drawn by isl data show")  # the kit's own file (in its manifest): no obstacle
    (out / "imagesTr" / "my_notes.txt").write_text("mine\n")
    n = gets(server)
    assert isl_main(fetch_args(out, server, hanseg_zip, "--fold", "1", "--force")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "imagesTr/my_notes.txt" in line and "move them out" in line
    assert (out / "imagesTr" / "my_notes.txt").read_text() == "mine\n" and gets(server) == n
    (out / "imagesTr" / "my_notes.txt").unlink()
    assert isl_main(fetch_args(out, server, hanseg_zip, "--fold", "1", "--force")) == 0
    assert (out / MARKER).is_file() and not (out / "cohort.png").exists()
    assert no_temporaries(tmp_path, out)


@pytest.mark.parametrize("force", [False, True])
def test_out_that_is_a_file_is_refused_before_downloading(server, hanseg_zip, tmp_path, capsys, force):
    out = tmp_path / "hanseg"
    out.write_text("a file of mine\n")
    assert isl_main(fetch_args(out, server, hanseg_zip, *(["--force"] if force else []))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out {out} is a file" in line
    assert out.read_text() == "a file of mine\n" and gets(server) == 0
    assert not (tmp_path / ".isl-cache").exists()


def test_a_killed_runs_temporaries_are_removed_and_nothing_else(server, hanseg_zip, tmp_path):
    out = tmp_path / "hanseg"
    # what a killed run leaves: the kit's own temporary names for this --out
    stale = [Path(tempfile.mkdtemp(dir=tmp_path, prefix=temp_prefix(out, k))) for k in ("extract", "partial", "old")]
    (stale[1] / "imagesTr").mkdir()
    (stale[1] / "imagesTr" / "case_01.nii.gz").write_bytes(b"half written")
    (tmp_path / ".hanseg.lock").write_text("")  # a killed run's lock file: the OS released its lock
    # look-alikes that are not this --out's temporaries
    keep = [tmp_path / name for name in (".hanseg2.partial-abcd1234", ".hanseg.partial-short", "hanseg.old-abcd1234",
                                         ".hanseg.backup-abcd1234")]
    for p in keep:
        p.mkdir()
    keep_file = tmp_path / ".hanseg.extract-zzzz9999"  # the right name, but a file: the kit only makes folders
    keep_file.write_text("x")
    fetch(FetchOptions("hanseg", out, url=server.url("HaN-Seg.zip"), sha256=fab.sha256_of(hanseg_zip), folds=3))
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in keep) and keep_file.read_text() == "x"
    assert not (tmp_path / ".hanseg.lock").exists() and (out / MARKER).is_file()


def test_a_case_the_user_added_to_a_fetched_folder_survives_fold_force(server, hanseg_zip, tmp_path, capsys):
    """Listed in dataset.json is not enough to count as the kit's: only the manifest's files, unchanged, do."""
    out = tmp_path / "hanseg"
    assert isl_main(fetch_args(out, server, hanseg_zip)) == 0
    mine = {out / "imagesTr" / "my_case.nii.gz": b"my image", out / "labelsTr" / "my_case.nii.gz": b"my label"}
    for path, data in mine.items():
        path.write_bytes(data)
    doc = json.loads((out / "dataset.json").read_text())
    doc["training"].append({"image": "imagesTr/my_case.nii.gz", "label": "labelsTr/my_case.nii.gz"})
    (out / "dataset.json").write_text(json.dumps(doc))
    before = snapshot(out)
    assert isl_main(fetch_args(out, server, hanseg_zip, "--fold", "1", "--force")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "3 file(s)" in line and "dataset.json" in line  # the edited dataset.json counts as the user's too
    assert snapshot(out) == before and no_temporaries(tmp_path, out)


def test_a_second_fetch_into_the_same_out_is_refused_and_leaves_the_first_alone(server, hanseg_zip, tmp_path):
    out = tmp_path / "hanseg"
    with out_lock(out):  # a fetch into `out` running in another process holds this
        running = Path(tempfile.mkdtemp(dir=tmp_path, prefix=temp_prefix(out, "partial")))
        with pytest.raises(FetchError, match=rf"another fetch is writing into {out}"):
            fetch(FetchOptions("hanseg", out, url=server.url("HaN-Seg.zip"), sha256=fab.sha256_of(hanseg_zip),
                               folds=3))
        assert running.is_dir() and gets(server) == 0
    assert not (tmp_path / ".hanseg.lock").exists()


@pytest.mark.parametrize("below", ["hanseg", "new/hanseg"])
def test_read_only_parent_is_one_line_before_downloading(server, hanseg_zip, tmp_path, capsys, monkeypatch, below):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root ignores the mode bits: refuse creating entries in `locked` as the kernel would for anybody else
    real_open, real_mkdir = os.open, os.mkdir

    def refused(real):
        def call(path, *args, **kwargs):
            if Path(path).parent == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", refused(real_open))
    monkeypatch.setattr(os, "mkdir", refused(real_mkdir))
    try:
        assert isl_main(fetch_args(locked / below, server, hanseg_zip)) == 2
    finally:
        locked.chmod(0o755)
    line = one_error_line(capsys.readouterr().err)
    assert str(locked) in line and "Permission denied" in line and "folder you can write to" in line
    assert gets(server) == 0 and list(locked.iterdir()) == []


@pytest.mark.parametrize("stage", ["extract", "convert"])
def test_full_disk_is_one_line_and_leaves_nothing(server, hanseg_zip, tmp_path, capsys, monkeypatch, stage):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "somewhere.nii.gz"))

    monkeypatch.setattr(*((extract, "_copy_stream") if stage == "extract" else (nibabel, "save")), no_space)
    out = tmp_path / "hanseg"
    assert isl_main(fetch_args(out, server, hanseg_zip)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "somewhere.nii.gz: no space left on the disk" in line and "bigger disk" in line
    assert not out.exists() and no_temporaries(tmp_path, out)
    # the verified archive stays in the cache, so the rerun after freeing space does not download it again
    assert sorted(p.name for p in (tmp_path / ".isl-cache").iterdir()) == ["HaN-Seg.zip"]
    n = gets(server)
    monkeypatch.undo()
    assert isl_main(fetch_args(out, server, hanseg_zip)) == 0
    assert gets(server) == n and (out / MARKER).is_file() and not (tmp_path / ".isl-cache").exists()


def test_retries_must_not_be_negative(tmp_path, capsys):
    try:  # argparse exits 2; isl may catch that and return 2 instead
        status = isl_main(["data", "fetch", "msd-pancreas", "--out", str(tmp_path / "x"), "--retries", "-1"])
    except SystemExit as e:
        status = e.code
    assert status == 2
    assert "argument --retries: must be 0 or more (got -1)" in capsys.readouterr().err
    with pytest.raises(FetchError, match="--retries must be 0 or more"):
        fetch(FetchOptions("msd-pancreas", tmp_path / "x", retries=-1))
    assert not (tmp_path / "x").exists()


def test_tar_members_pass_tarfiles_data_filter_too(tmp_path, monkeypatch):
    """The kit's member checks and tarfile's data filter are independent: with the first one switched off
    (as a bug would), the second still refuses a member that climbs out of the target."""
    archive = fab.make_traversal_tar(tmp_path / "t.tar")
    monkeypatch.setattr(extract, "check_members", lambda archive, members: None)
    monkeypatch.setattr(extract, "_target", lambda dest, name: dest / name)
    with pytest.raises(FetchError, match="refused to extract"):
        extract.safe_extract(archive, tmp_path / "x", include=lambda n: "evil" in n)
    assert not list(tmp_path.rglob("evil.txt"))
    tar_mode = tmp_path / "mode.tar"
    with tarfile.open(tar_mode, "w") as tf:
        ti = tarfile.TarInfo("a/b.nii.gz")
        ti.size, ti.mode = 3, 0o6777
        tf.addfile(ti, io.BytesIO(b"abc"))
    (written,) = extract.safe_extract(tar_mode, tmp_path / "y")
    assert written.read_bytes() == b"abc" and not written.stat().st_mode & 0o6022  # no setuid, no others' write
