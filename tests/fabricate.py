"""Test fixtures of the dataset fetcher: fabricated archives with each source's real internal layout, and a local HTTP
server.

The volumes are tiny (a few voxels) but the member names, folder nesting, file formats (NIfTI, Slicer-style
``.seg.nrrd`` in LPS space), AppleDouble sidecars and label conventions are those of the published archives,
so the whole fetch -> verify -> extract -> convert path runs offline in seconds. The server speaks HTTP/1.0 on
127.0.0.1, honours ``Range`` and can be told to drop a connection after N bytes or to answer an error status.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np

from data_download.sources import (
    BTCV_CASES,
    HANSEG_OARS,
    SAMPLE_CT_MEMBER,
    SAMPLE_LICENSE_MEMBER,
    SAMPLE_SDIST_ROOT,
    SAMPLE_SEG_MEMBER,
)

SHAPE = (8, 7, 5)


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def md5_of(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def nifti_gz(array: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    img = nib.Nifti1Image(np.asarray(array), np.diag([1.5, 1.5, 2.5, 1.0]) if affine is None else affine)
    img.set_data_dtype(np.asarray(array).dtype)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _ct(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


def _labels(rng: np.random.Generator, n_labels: int, shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for k in range(1, n_labels + 1):
        x, y, z = (int(rng.integers(0, s)) for s in shape)
        lab[x, y, z] = k
    return lab


# ------------------------------------------------------------------------------------------------------ BTCV
def make_btcv_zip(path: str | Path, cases: tuple[str, ...] = BTCV_CASES, n_testing: int = 2) -> Path:
    """``RawData.zip``: RawData/Training/{img,label}/ for ``cases`` and a few RawData/Testing/img files."""
    rng = np.random.default_rng(0)
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("RawData/", b"")
        for cid in cases:
            num = cid[3:]
            zf.writestr(f"RawData/Training/img/img{num}.nii.gz", nifti_gz(_ct(rng)))
            zf.writestr(f"RawData/Training/label/label{num}.nii.gz", nifti_gz(_labels(rng, 13)))
        for k in range(n_testing):
            zf.writestr(f"RawData/Testing/img/img{61 + k:04d}.nii.gz", nifti_gz(_ct(rng)))
    return path


# --------------------------------------------------------------------------------------------------- HaN-Seg
def nrrd_bytes(data: np.ndarray, origin=(10.0, 20.0, -30.0), spacing=(1.0, 1.0, 2.0), seg: bool = False) -> bytes:
    """A gzip-encoded NRRD in LPS space, as 3D Slicer writes CTs and ``.seg.nrrd`` segmentations."""
    import nrrd

    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag(np.asarray(spacing, dtype=float)),
        "space origin": np.asarray(origin, dtype=float),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    if seg:  # the key/value fields Slicer adds to a segmentation (ignored by the converter)
        header.update({"Segment0_ID": "Segment_1", "Segment0_LabelValue": "1", "Segment0_Layer": "0"})
    buf = io.BytesIO()
    nrrd.write(buf, np.asarray(data), header)
    return buf.getvalue()


def make_hanseg_zip(path: str | Path, n_cases: int = 5) -> Path:
    """``HaN-Seg.zip``: HaN-Seg/set_1/case_XX/ with CT, MR and OAR masks.

    In case_01, OpticChiasm (8 voxels) lies inside Brainstem (48 voxels): the overlap rule must give the shared
    voxels to OpticChiasm. SpinalCord is stored on a cropped sub-grid (its own origin), as Slicer may write it.
    Other cases carry a subset of organs (missing organs are normal in HaN-Seg).
    """
    rng = np.random.default_rng(1)
    path = Path(path)
    shape = (10, 9, 6)
    origin = np.array([10.0, 20.0, -30.0])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for c in range(1, n_cases + 1):
            cid = f"case_{c:02d}"
            base = f"HaN-Seg/set_1/{cid}/{cid}"
            zf.writestr(f"{base}_IMG_CT.nrrd", nrrd_bytes(_ct(rng, shape)))
            zf.writestr(f"{base}_IMG_MR_T1.nrrd", nrrd_bytes(rng.integers(0, 500, size=(5, 5, 4)).astype(np.int16)))
            brainstem = np.zeros(shape, np.uint8)
            brainstem[2:6, 2:5, 1:5] = 1
            chiasm = np.zeros(shape, np.uint8)
            chiasm[3:5, 3:5, 2:4] = 1
            cord = np.ones((2, 2, 3), np.uint8)  # on a sub-grid starting at voxel (7, 6, 2) of the CT
            # LPS origin of voxel (7, 6, 2): spacing (1, 1, 2) along +L, +P, +S
            cord_origin = origin + np.array([7.0, 6.0, 4.0])
            masks = {"Brainstem": (brainstem, origin), "OpticChiasm": (chiasm, origin),
                     "SpinalCord": (cord, cord_origin)}
            for k, organ in enumerate(HANSEG_OARS[:4]):  # a few more organs, one voxel each
                m = np.zeros(shape, np.uint8)
                m[k, 0, 0] = 1
                masks[organ] = (m, origin)
            if c % 2 == 0:
                masks.pop("OpticChiasm")
            for organ, (m, o) in sorted(masks.items()):
                zf.writestr(f"{base}_OAR_{organ}.seg.nrrd", nrrd_bytes(m, origin=o, seg=True))
        zf.writestr("__MACOSX/HaN-Seg/set_1/._case_01", b"\x00\x05\x16\x07 AppleDouble")
    return path


# ---------------------------------------------------------------------------------------------- MSD Task07
def msd_case_ids(n: int = 281) -> list[str]:
    """Case ids with gaps, like the published ones (pancreas_001 .. pancreas_421, 281 of them)."""
    return [f"pancreas_{i:03d}" for i in range(1, 422) if i % 3 != 0][:n]


def make_msd_tar(path: str | Path, n_cases: int = 281, n_test: int = 2,
                 extra_members: list[tarfile.TarInfo] | None = None) -> Path:
    """``Task07_Pancreas.tar``: dataset.json, imagesTr, labelsTr, imagesTs and ``._*`` AppleDouble sidecars."""
    rng = np.random.default_rng(2)
    path = Path(path)
    ids = msd_case_ids(n_cases)
    doc = {"name": "Pancreas", "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
           "numTraining": len(ids), "training": [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"}
                                                 for i in ids]}

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

    with tarfile.open(path, "w") as tf:
        add(tf, "Task07_Pancreas/dataset.json", json.dumps(doc).encode())
        add(tf, "Task07_Pancreas/._dataset.json", b"\x00\x05\x16\x07 AppleDouble")
        for i in ids:
            add(tf, f"Task07_Pancreas/imagesTr/{i}.nii.gz", nifti_gz(_ct(rng)))
            add(tf, f"Task07_Pancreas/imagesTr/._{i}.nii.gz", b"\x00\x05\x16\x07 AppleDouble")
            add(tf, f"Task07_Pancreas/labelsTr/{i}.nii.gz", nifti_gz(_labels(rng, 2)))
        for k in range(n_test):
            add(tf, f"Task07_Pancreas/imagesTs/pancreas_{422 + k:03d}.nii.gz", nifti_gz(_ct(rng)))
        for ti in extra_members or []:
            tf.addfile(ti, io.BytesIO(b"x" * ti.size) if ti.isfile() else None)
    return path


# ------------------------------------------------------------------------------------------------------ sample
def make_sample_sdist(path: str | Path) -> Path:
    """A stand-in for the TotalSegmentator 2.18.0 sdist with its two reference files and LICENSE.

    The label map uses TotalSegmentator ids: 1 spleen, 5 liver, 52 aorta, 15 esophagus, and 90 brain (which
    has no BTCV id and must become background).
    """
    rng = np.random.default_rng(3)
    seg = np.zeros(SHAPE, np.uint8)
    seg[0, 0, 0], seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3], seg[4, 4, 4] = 1, 5, 52, 15, 90
    files = {
        SAMPLE_CT_MEMBER: nifti_gz(rng.integers(-1000, 1000, size=SHAPE).astype(np.int32), np.diag([3, 3, 3, 1.0])),
        SAMPLE_SEG_MEMBER: nifti_gz(seg, np.diag([3, 3, 3, 1.0])),
        SAMPLE_LICENSE_MEMBER: b"                                 Apache License\n  Version 2.0, January 2004\n",
        f"{SAMPLE_SDIST_ROOT}/setup.py": b"from setuptools import setup\nsetup()\n",
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return Path(path)


# ------------------------------------------------------------------------------------------- hostile archives
def make_traversal_tar(path: str | Path) -> Path:
    """An MSD-shaped tar with one member that climbs out of the target (``../``)."""
    ti = tarfile.TarInfo("Task07_Pancreas/../../evil.txt")
    ti.size = 4
    return make_msd_tar(path, n_cases=3, extra_members=[ti])


def make_symlink_tar(path: str | Path) -> Path:
    """An MSD-shaped tar with a symbolic link pointing outside the target."""
    ti = tarfile.TarInfo("Task07_Pancreas/imagesTr/link.nii.gz")
    ti.type = tarfile.SYMTYPE
    ti.linkname = "/etc/passwd"
    return make_msd_tar(path, n_cases=3, extra_members=[ti])


def make_symlink_zip(path: str | Path) -> Path:
    """A HaN-Seg-shaped zip with a Unix symlink member (zip stores the link target as the member's data)."""
    path = make_hanseg_zip(path, n_cases=1)
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("HaN-Seg/set_1/case_01/escape")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../../../../tmp")
    return path


# ---------------------------------------------------------------------------------------------------- server
class ArchiveServer:
    """In-memory files over HTTP on 127.0.0.1, with ``Range``, dropped connections and forced error statuses.

    ``drop_after[path] = n`` makes the next GET of ``path`` send ``n`` body bytes and then close the connection
    (once); ``status[path] = code`` answers every request for ``path`` with ``code``. ``requests`` records
    (method, path, Range header) of every request, so tests can check that a resume asked for the right range.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.range_support = True
        self.requests: list[tuple[str, str, str | None]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, name: str, data: bytes | Path) -> str:
        """Serve ``data`` at ``/name``; return its URL."""
        self.files["/" + name.lstrip("/")] = data.read_bytes() if isinstance(data, Path) else data
        return self.url(name)

    def url(self, name: str) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{name.lstrip('/')}"

    def start(self) -> ArchiveServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _answer(self, head_only: bool) -> None:
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append((self.command, path, rng))
                if path in server.status:
                    self.send_error(server.status[path])
                    return
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start, end, code = 0, len(data) - 1, 200
                if rng and server.range_support:
                    first, _, last = rng.removeprefix("bytes=").partition("-")
                    start = int(first)
                    end = min(int(last), len(data) - 1) if last else len(data) - 1
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    code = 206
                body = data[start:end + 1]
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if head_only:
                    return
                cut = server.drop_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer(head_only=False)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(head_only=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
