"""End to end: fabricated archives with each source's real layout -> fetch -> verify -> convert -> valid dataset.

The fabricated archives have other checksums than the published ones, so every test pins the checksum of the
archive it serves with ``--md5``/``--sha256`` (the same flags a user with a mirror would use) and points the
source at a local server with ``--url``. Nothing here touches the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import fabricate as fab
import nibabel as nib
import numpy as np
import pytest

from data_download.cli import main
from data_download.dataset_folder import MARKER
from data_download.errors import FetchError
from data_download.fetch import FetchOptions, fetch
from data_download.labels import BTCV_LABELS
from data_download.sources import HANSEG_OARS, MONAI_BTCV_TRAINING, MONAI_BTCV_VALIDATION, MSD_PANCREAS_N_SELECTED

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    srv = fab.ArchiveServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """Every fabricated archive, built once for the module (the MSD one holds all 281 tiny cases)."""
    d = tmp_path_factory.mktemp("archives")
    return {
        "btcv": fab.make_btcv_zip(d / "RawData.zip"),
        "hanseg": fab.make_hanseg_zip(d / "HaN-Seg.zip"),
        "msd": fab.make_msd_tar(d / "Task07_Pancreas.tar"),
        "sample": fab.make_sample_sdist(d / "totalsegmentator-2.18.0.tar.gz"),
    }


def load(out: Path):
    from isl_core.data import load_dataset

    return load_dataset(out)


def no_leftovers(parent: Path) -> bool:
    """No hidden partial/extract folders next to the output (a failed fetch must clean up after itself)."""
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".extract-" in p.name]


def test_btcv_from_file_monai_split(archives, tmp_path):
    out = tmp_path / "btcv"
    assert main(["btcv", "--out", str(out), "--from-file", str(archives["btcv"]),
                 "--md5", fab.md5_of(archives["btcv"])]) == 0
    ds = load(out)
    assert ds.labels == BTCV_LABELS
    assert [c.id for c in ds.training] == list(MONAI_BTCV_TRAINING)
    assert [c.id for c in ds.validation] == list(MONAI_BTCV_VALIDATION)
    assert ds.training[0].label.name == "label0001.nii.gz"  # MONAI dataset_0.json names
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["source_sha256"] == fab.sha256_of(archives["btcv"])
    assert (out / "LICENSE.txt").is_file() and (out / "CITATION.txt").is_file()
    assert archives["btcv"].is_file()  # the user's own file is never deleted
    assert not (out / "imagesTs").exists()  # the unlabelled Testing cases are not used
    assert sorted(p.name for p in tmp_path.iterdir()) == ["btcv"]  # no cache or temporary folders left


def test_btcv_kfold(archives, tmp_path):
    out = tmp_path / "btcv"
    assert main(["btcv", "--out", str(out), "--from-file", str(archives["btcv"]), "--md5",
                 fab.md5_of(archives["btcv"]), "--folds", "5", "--fold", "3", "--seed", "1"]) == 0
    ds = load(out)
    assert (len(ds.training), len(ds.validation)) == (24, 6)
    assert json.loads((out / "dataset.json").read_text())["split"]["fold"] == 3
    # a folder fetched when folds were dealt in sha256 order holds other cases: refused, not taken as this split
    marker = json.loads((out / MARKER).read_text())
    del marker["split"]["assignment"]
    (out / MARKER).write_text(json.dumps(marker))
    with pytest.raises(FetchError, match="older sha256 order"):
        fetch(FetchOptions("btcv", out, from_file=str(archives["btcv"]), md5=fab.md5_of(archives["btcv"]), folds=5,
                           fold=3, seed=1))


def test_btcv_synapse_token_from_environment(archives, tmp_path, monkeypatch):
    """synapseclient is optional: a stand-in module checks the token comes from the environment only."""
    seen = {}

    class FakeSynapse:
        def login(self, authToken=None, silent=False):  # noqa: N803 (synapseclient's spelling)
            seen["token"] = authToken

        def get(self, entity, downloadLocation=None, ifcollision=None):  # noqa: N803
            seen["entity"] = entity
            dest = Path(downloadLocation) / "RawData.zip"
            dest.write_bytes(archives["btcv"].read_bytes())
            return types.SimpleNamespace(path=str(dest))

    monkeypatch.setitem(sys.modules, "synapseclient", types.SimpleNamespace(Synapse=FakeSynapse))
    monkeypatch.setenv("SYNAPSE_AUTH_TOKEN", "token-from-env")
    out = tmp_path / "btcv"
    assert main(["btcv", "--out", str(out), "--md5", fab.md5_of(archives["btcv"])]) == 0
    assert seen == {"token": "token-from-env", "entity": "syn3379050"}
    assert len(load(out).training) == 24
    assert not (tmp_path / ".isl-cache").exists()  # our downloaded copy is removed after success


def test_btcv_without_token_explains_both_routes(tmp_path, monkeypatch):
    monkeypatch.delenv("SYNAPSE_AUTH_TOKEN", raising=False)
    with pytest.raises(FetchError, match="SYNAPSE_AUTH_TOKEN.*--from-file"):
        fetch(FetchOptions("btcv", tmp_path / "btcv"))
    monkeypatch.setenv("SYNAPSE_AUTH_TOKEN", "x")
    monkeypatch.setitem(sys.modules, "synapseclient", None)  # not installed
    with pytest.raises(FetchError, match="pip install synapseclient"):
        fetch(FetchOptions("btcv", tmp_path / "sub" / "btcv"))
    assert not (tmp_path / "sub").exists()


def test_hanseg_merges_masks_by_name_with_overlap_rule(archives, server, tmp_path):
    url = server.add("HaN-Seg.zip", archives["hanseg"])
    out = tmp_path / "hanseg"
    assert main(["hanseg", "--out", str(out), "--url", url, "--sha256", fab.sha256_of(archives["hanseg"])]) == 0
    ds = load(out)
    assert ds.labels == {0: "background", **{i + 1: n for i, n in enumerate(HANSEG_OARS)}}
    assert len(ds.training) + len(ds.validation) == 5
    lab = nib.load(str(out / "labelsTr" / "case_01.nii.gz"))
    a = np.asanyarray(lab.dataobj)
    ids = {n: i + 1 for i, n in enumerate(HANSEG_OARS)}
    # OpticChiasm (8 voxels) sits inside Brainstem (48): the smaller organ keeps the shared voxels
    assert (a == ids["OpticChiasm"]).sum() == 8 and (a == ids["Brainstem"]).sum() == 40
    # SpinalCord was stored on a cropped sub-grid starting at CT voxel (7, 6, 2): pasted by world position
    cord = np.argwhere(a == ids["SpinalCord"])
    assert cord.min(0).tolist() == [7, 6, 2] and cord.max(0).tolist() == [8, 7, 4]
    ct = nib.load(str(out / "imagesTr" / "case_01.nii.gz"))
    assert np.allclose(ct.affine, lab.affine) and ct.affine[0, 0] < 0  # LPS NRRD -> RAS NIfTI
    assert ct.get_data_dtype() == np.int16
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["overlaps"]["voxels_lost_per_organ"]["case_01"] == {"Brainstem": 8}
    assert "MR" not in " ".join(p.name for p in out.rglob("*"))


def test_msd_pancreas_210_selection_and_appledouble(archives, server, tmp_path):
    url = server.add("Task07_Pancreas.tar", archives["msd"])
    out = tmp_path / "msd"
    assert main(["msd-pancreas", "--out", str(out), "--url", url, "--md5", fab.md5_of(archives["msd"])]) == 0
    ds = load(out)
    assert ds.labels == {0: "background", 1: "pancreas", 2: "tumour"}
    assert (len(ds.training), len(ds.validation)) == (168, 42)
    doc = json.loads((out / "dataset.json").read_text())
    assert len(doc["excluded_cases"]) == 281 - MSD_PANCREAS_N_SELECTED
    assert not list(out.rglob("._*"))
    # the selection is a property of the case ids, not of the split seed
    out2 = tmp_path / "msd2"
    assert main(["msd-pancreas", "--out", str(out2), "--url", url, "--md5", fab.md5_of(archives["msd"]),
                 "--seed", "7"]) == 0
    from isl_core.data import read_dataset_json  # the folder was validated above; the ids are what matter here

    ds2 = read_dataset_json(out2)
    assert {c.id for c in ds.training + ds.validation} == {c.id for c in ds2.training + ds2.validation}
    assert {c.id for c in ds.validation} != {c.id for c in ds2.validation}


def test_sample_offline_remaps_totalsegmentator_ids(archives, server, tmp_path):
    url = server.add("totalsegmentator-2.18.0.tar.gz", archives["sample"])
    out = tmp_path / "sample"
    assert main(["sample", "--out", str(out), "--url", url, "--sha256", fab.sha256_of(archives["sample"])]) == 0
    ds = load(out)
    assert len(ds.training) == 1 and ds.validation == []
    a = np.asanyarray(nib.load(str(ds.training[0].label)).dataobj)
    # TotalSegmentator 1 spleen, 5 liver, 52 aorta, 15 esophagus, 90 brain -> BTCV 1, 6, 8, 5, background
    assert a[0, 0, 0] == 1 and a[1, 1, 1] == 6 and a[2, 2, 2] == 8 and a[3, 3, 3] == 5 and a[4, 4, 4] == 0
    assert "Apache License" in (out / "LICENSE.txt").read_text()


def test_rerun_is_a_no_op_and_split_change_needs_force(archives, server, tmp_path, capsys):
    url = server.add("HaN-Seg.zip", archives["hanseg"])
    out = tmp_path / "hanseg"
    args = ["hanseg", "--out", str(out), "--url", url, "--sha256", fab.sha256_of(archives["hanseg"])]
    assert main(args) == 0
    n_requests = len(server.requests)
    stamp = (out / MARKER).stat().st_mtime_ns
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(server.requests) == n_requests and (out / MARKER).stat().st_mtime_ns == stamp
    assert main([*args, "--fold", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--fold", "1", "--force"]) == 0
    assert json.loads((out / "dataset.json").read_text())["split"]["fold"] == 1
    assert no_leftovers(tmp_path)


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "deep" / "hanseg"
    proc = subprocess.run([sys.executable, "-m", "data_download", "hanseg", "--out", str(out), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in proc.stdout and "zenodo.org/records/7442914" in proc.stdout
    assert "CC BY-NC-ND 4.0" in proc.stdout  # the terms are printed before anything happens
    assert not (tmp_path / "deep").exists()
