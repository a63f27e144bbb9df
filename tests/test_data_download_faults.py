"""Faults: dropped connections resume, corrupt archives fail their checksum, hostile archives are refused, HTTP
errors read clearly, a full disk is caught before the download. None of them leaves a partial dataset."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import fabricate as fab
import pytest

from data_download import download as dl
from data_download.cli import main
from data_download.errors import FetchError
from data_download.fetch import FetchOptions, fetch


@pytest.fixture
def server():
    srv = fab.ArchiveServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture(scope="module")
def msd_small(tmp_path_factory) -> Path:
    return fab.make_msd_tar(tmp_path_factory.mktemp("a") / "Task07_Pancreas.tar", n_cases=12)


def msd_opts(out: Path, url: str, archive: Path, **kw) -> FetchOptions:
    return FetchOptions("msd-pancreas", out, url=url, md5=fab.md5_of(archive), n_cases=10, **kw)


def assert_clean(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".extract-" in p.name]


def test_dropped_connection_resumes_with_range(server, msd_small, tmp_path):
    url = server.add("t.tar", msd_small)
    size = msd_small.stat().st_size
    server.drop_after["/t.tar"] = size // 3
    out = tmp_path / "msd"
    assert fetch(msd_opts(out, url, msd_small)) == out
    gets = [r for r in server.requests if r[0] == "GET"]
    assert gets[0][2] is None and gets[1][2] == f"bytes={size // 3}-"
    from isl_core.data import load_dataset

    assert len(load_dataset(out).training) == 8


def test_partial_file_from_an_earlier_run_is_resumed(server, msd_small, tmp_path):
    url = server.add("t.tar", msd_small)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Task07_Pancreas.tar.part").write_bytes(msd_small.read_bytes()[:5000])
    fetch(msd_opts(tmp_path / "msd", url, msd_small, cache=cache))
    assert ("GET", "/t.tar", "bytes=5000-") in server.requests
    assert (cache / "Task07_Pancreas.tar").is_file()  # an explicit --cache keeps the verified archive


def test_server_without_range_support_restarts_cleanly(server, msd_small, tmp_path):
    url = server.add("t.tar", msd_small)
    server.range_support = False
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Task07_Pancreas.tar.part").write_bytes(b"stale bytes that must not survive")
    fetch(msd_opts(tmp_path / "msd", url, msd_small, cache=cache))
    assert fab.md5_of(cache / "Task07_Pancreas.tar") == fab.md5_of(msd_small)


def test_complete_part_file_answered_416_is_verified(server, msd_small, tmp_path):
    url = server.add("t.tar", msd_small)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Task07_Pancreas.tar.part").write_bytes(msd_small.read_bytes())
    fetch(msd_opts(tmp_path / "msd", url, msd_small, cache=cache))
    assert (tmp_path / "msd" / "dataset.json").is_file()


def test_corrupt_archive_fails_checksum_and_leaves_nothing(server, msd_small, tmp_path, capsys):
    data = bytearray(msd_small.read_bytes())
    data[len(data) // 2] ^= 0xFF
    url = server.add("t.tar", bytes(data))
    out = tmp_path / "msd"
    assert main(["msd-pancreas", "--out", str(out), "--url", url, "--md5", fab.md5_of(msd_small),
                 "--n-cases", "10"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and url in err and fab.md5_of(msd_small) in err
    assert_clean(tmp_path, out)
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("Task07_Pancreas.tar"))
    assert not (tmp_path / ".isl-cache").exists()


def test_corrupt_local_file_names_the_file(tmp_path):
    bad = tmp_path / "RawData.zip"
    bad.write_bytes(b"not the Synapse archive")
    with pytest.raises(FetchError, match=r"checksum mismatch for .*RawData\.zip: md5 is"):
        fetch(FetchOptions("btcv", tmp_path / "btcv", from_file=bad))
    assert_clean(tmp_path, tmp_path / "btcv")


@pytest.mark.parametrize("make, source, why", [
    (fab.make_traversal_tar, "msd-pancreas", "'..'"),
    (fab.make_symlink_tar, "msd-pancreas", "symlink"),
    (fab.make_symlink_zip, "hanseg", "symlink"),
])
def test_hostile_archives_are_refused(server, tmp_path, make, source, why):
    archive = make(tmp_path / "evil.archive")
    url = server.add("evil", archive)
    out = tmp_path / "work" / "out"
    with pytest.raises(FetchError, match="refused to extract") as e:
        fetch(FetchOptions(source, out, url=url, sha256=fab.sha256_of(archive)))
    assert why in str(e.value)
    assert_clean(tmp_path / "work", out)
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("escape"))


@pytest.mark.parametrize("code", [404, 403])
def test_http_client_error_is_reported_at_once(server, tmp_path, capsys, code):
    server.add("t.tar", b"x")
    server.status["/t.tar"] = code
    out = tmp_path / "msd"
    assert main(["msd-pancreas", "--out", str(out), "--url", server.url("t.tar")]) == 2
    err = capsys.readouterr().err
    assert f"HTTP {code}" in err and server.url("t.tar") in err and "sources.py" in err
    assert len([r for r in server.requests if r[0] == "GET"]) == 1  # a missing file is not retried
    assert_clean(tmp_path, out)


def test_http_server_error_is_retried_then_reported(server, tmp_path, capsys):
    server.add("t.tar", b"x")
    server.status["/t.tar"] = 500
    out = tmp_path / "msd"
    assert main(["msd-pancreas", "--out", str(out), "--url", server.url("t.tar"), "--retries", "2"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "3 tries" in err and "try later" in err
    assert len([r for r in server.requests if r[0] == "GET"]) == 3
    assert_clean(tmp_path, out)


def test_unreachable_host_is_reported(tmp_path):
    with pytest.raises(FetchError, match="failed after 1 tries"):
        fetch(FetchOptions("msd-pancreas", tmp_path / "msd", url="http://127.0.0.1:9/none.tar", retries=0))


def test_full_disk_is_caught_before_downloading(server, msd_small, tmp_path, monkeypatch):
    url = server.add("t.tar", msd_small)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(FetchError, match="not enough free disk"):
        fetch(msd_opts(tmp_path / "msd", url, msd_small))
    assert not [r for r in server.requests if r[0] == "GET"]
