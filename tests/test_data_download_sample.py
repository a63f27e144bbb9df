"""The real thing: `isl data fetch sample` against PyPI (marked ``network``; CI runs it).

Downloads the pinned TotalSegmentator 2.18.0 sdist (38 MB) with pip, checks its sha256 against the sources
table, and builds a dataset folder from the real CT and its label map in BTCV ids.
"""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from data_download.cli import main
from data_download.labels import BTCV_LABELS
from data_download.sources import SOURCES

pytestmark = pytest.mark.network

#: sha256 of tests/reference_files/example_ct.nii.gz inside the sdist: the CT is copied byte for byte
EXAMPLE_CT_SHA256 = "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"


def test_fetch_sample_from_pypi(tmp_path):
    from isl_core.data import load_dataset

    out = tmp_path / "sample"
    assert main(["sample", "--out", str(out), "--no-progress"]) == 0
    ds = load_dataset(out)
    assert ds.labels == BTCV_LABELS and len(ds.training) == 1 and ds.validation == []
    case = ds.training[0]
    assert hashlib.sha256(case.image.read_bytes()).hexdigest() == EXAMPLE_CT_SHA256
    ct, lab = nib.load(str(case.image)), nib.load(str(case.label))
    assert ct.shape == lab.shape == (122, 101, 112) and np.allclose(ct.header.get_zooms(), 3.0)
    present = set(np.unique(np.asanyarray(lab.dataobj)).tolist()) - {0}
    assert present == set(range(1, 14)) - {5}  # 12 organs; the esophagus is outside the field of view
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["source_sha256"] == SOURCES["sample"].checksum
    assert doc["organs_absent"] == ["esophagus"]
    assert "Apache License" in (out / "LICENSE.txt").read_text()
    assert not (tmp_path / ".isl-cache").exists()
    # a second run finds the data in place and does nothing
    assert main(["sample", "--out", str(out), "--no-progress"]) == 0
