"""JupyterLab serves the notebooks, runs a kernel that imports the kit, and shows the slice viewer in a browser.

Each server is started as a subprocess on 127.0.0.1 with a random token and its own runtime and config folders
(nothing is written into the repository or the user's Jupyter settings), and stopped by its PID (terminate, then
kill if it does not exit).

* ``lab`` (served from ``notebooks/``): the REST API lists the notebooks; a ``python3`` kernel executes
  ``import isl_core`` over the kernel's websocket channel, the path a browser takes.
* The browser test: a real headless Chromium (Debian's ``chromium`` package, which ``.ci/run`` installs with
  apt-get when missing) driven by Playwright through ``executable_path`` (Playwright's own browser download is
  never used). It opens a small notebook, written into the test's temporary folder, that calls
  ``isl_core.viz.slice_viewer`` on a synthetic sphere; runs it; moves the slice slider with the keyboard; and
  checks that the slice image the kernel sends back changes. The screenshot stays in the temporary folder
  (``jupyterlab_slice_viewer.png``). The numbered notebooks are not used here: they train networks.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from isl_core.reproduce import NOTEBOOK_DIR

HOST = "127.0.0.1"
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, port: int, token: str, proc: subprocess.Popen, log: Path):
        self.port, self.token, self.proc, self.log = port, token, proc, log

    def request(self, path: str, method: str = "GET", body: dict | None = None, timeout: float = 30):
        req = urllib.request.Request(f"http://{HOST}:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
            return resp.status, (json.loads(data) if data else None)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""


@contextlib.contextmanager
def _start_lab(root_dir: Path, tmp: Path, *extra_args: str) -> Iterator[Lab]:
    """A JupyterLab server serving ``root_dir``; its settings, runtime files and log live in ``tmp``."""
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1"}
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ip={HOST}", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root_dir}", "--LabApp.extension_manager=readonly", *extra_args]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers often run as root
        cmd.append("--allow-root")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    server = Lab(port, token, proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if server.request("/api/status", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer within {START_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with _start_lab(NOTEBOOK_DIR, tmp_path_factory.mktemp("jupyterlab")) as server:
        yield server


def test_lab_lists_the_notebooks(lab):
    status, listing = lab.request("/api/contents")
    assert status == 200
    served = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
    assert served == sorted(p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    status, nb = lab.request(f"/api/contents/{served[0]}")
    assert status == 200 and nb["format"] == "json" and nb["content"]["cells"]


def _execute(lab: Lab, kernel_id: str, code: str, timeout: float = 120) -> tuple[dict, str]:
    """Run ``code`` over the kernel's websocket; returns (execute_reply content, captured stdout)."""
    import websocket  # websocket-client, a dependency of jupyter_server

    ws = websocket.create_connection(f"ws://{HOST}:{lab.port}/api/kernels/{kernel_id}/channels?token={lab.token}",
                                     timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                       "session": uuid.uuid4().hex, "date": datetime.now(UTC).isoformat(), "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        # The reply (shell channel) and the output (iopub channel) may arrive in any order; the output is complete
        # when the kernel reports "idle" for this request.
        stdout, reply, idle, deadline = [], None, False, time.monotonic() + timeout
        while (reply is None or not idle) and time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream" and msg["content"].get("name") == "stdout":
                stdout.append(msg["content"]["text"])
            elif msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                idle = True
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
        if reply is None or not idle:
            raise TimeoutError(f"no complete answer to the execute request within {timeout} s")
        return reply, "".join(stdout)
    finally:
        ws.close()


def test_kernel_imports_isl_core(lab):
    status, kernel = lab.request("/api/kernels", method="POST", body={"name": "python3"})
    assert status == 201, kernel
    try:
        reply, out = _execute(lab, kernel["id"], "import isl_core, sys\nprint(isl_core.__version__, sys.executable)")
        assert reply["status"] == "ok", f"{reply.get('ename')}: {reply.get('evalue')}\n{lab.log_tail()}"
        version, executable = out.split()
        assert version == __import__("isl_core").__version__
        assert Path(executable).resolve() == Path(sys.executable).resolve(), "the kernel is not this environment's"
    finally:
        lab.request(f"/api/kernels/{kernel['id']}", method="DELETE")


# ------------------------------------------------------------------------------------------ a real browser

#: Flags for a headless Chromium run as root in a container with no network beyond this machine: no sandbox
#: (root), no GPU, and none of the background traffic (updates, sync, QUIC) a fresh profile would start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHROMIUM_NAMES = ("chromium", "chromium-headless-shell", "chromium-browser")
BROWSER_TIMEOUT_MS = 60_000

VIEWER_CODE = """\
import numpy as np
from isl_core.viz import slice_viewer

# A sphere in a 32 x 32 x 16 volume: every axial slice cuts a disc of a different radius.
x, y, z = np.meshgrid(np.arange(32), np.arange(32), np.arange(16), indexing="ij")
image = np.where((x - 16) ** 2 + (y - 16) ** 2 + (2 * z - 16) ** 2 < 196, 0.8, 0.1).astype(np.float32)
viewer = slice_viewer(image, (image > 0.5).astype(int), num_classes=2)
"""


def _chromium() -> str | None:
    """Debian's Chromium (``$ISL_CHROMIUM`` first, then the package's command names)."""
    for name in (os.environ.get("ISL_CHROMIUM"), *CHROMIUM_NAMES):
        if name and (path := shutil.which(name)):
            return path
    return None


def _viewer_notebook(folder: Path) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(VIEWER_CODE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "viewer.ipynb"
    nbformat.write(nb, path)
    return path


def _slice_png(page) -> str:
    """The src of the viewer's slice image (a data: URL of the PNG the kernel sent), '' while there is none."""
    return page.evaluate("""() => {
        const img = document.querySelector('.jp-OutputArea-output .widget-output img, .widget-output img');
        return img ? img.getAttribute('src') : '';
    }""")


def test_slice_viewer_in_a_real_browser(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip(f"no Chromium found ({', '.join(CHROMIUM_NAMES)}): `apt-get install chromium` "
                    "(.ci/run installs it when missing)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright missing: pip install -c constraints.txt -e '.[course]'")
    root = tmp_path / "lab_root"
    root.mkdir()
    _viewer_notebook(root)
    screenshot = tmp_path / "jupyterlab_slice_viewer.png"
    # expose_app_in_browser: window.jupyterapp runs JupyterLab commands (run all cells) without clicking menus.
    with _start_lab(root, tmp_path, "--LabApp.expose_app_in_browser=True") as server, \
            sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            page.goto(f"http://{HOST}:{server.port}/lab/tree/viewer.ipynb?token={server.token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_selector(".widget-slider .noUi-handle")
            page.wait_for_function("() => !!document.querySelector('.widget-output img')")
            before = _slice_png(page)
            readout_before = page.inner_text(".widget-slider .widget-readout")

            page.focus(".widget-slider .noUi-handle")
            for _ in range(3):  # three slices up: the disc of the sphere shrinks
                page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "(old) => { const img = document.querySelector('.widget-output img');"
                " return img && img.getAttribute('src') !== old; }", arg=before)
            page.wait_for_timeout(500)  # let the last redraw (one per key press) land before the screenshot
            after = _slice_png(page)
            readout_after = page.inner_text(".widget-slider .widget-readout")
            page.screenshot(path=str(screenshot))
            errors = page.evaluate("() => Array.from(document.querySelectorAll("
                                   "'.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]'))"
                                   ".map(e => e.innerText)")
        finally:
            context.close()
    assert before.startswith("data:image/png;base64,"), before[:80]
    assert after.startswith("data:image/png;base64,") and after != before, "the slice image did not change"
    assert int(readout_before) == 8 and int(readout_after) > int(readout_before), (readout_before, readout_after)
    assert not errors, errors
    assert screenshot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
