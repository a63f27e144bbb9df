"""JupyterLab serves the notebooks and runs a kernel that imports the kit (``make lab`` works).

The server is started as a subprocess on 127.0.0.1 with a random token and its own runtime and config folders
(nothing is written into the repository or the user's Jupyter settings). The test lists the notebooks through
the REST API, starts a ``python3`` kernel, and executes ``import isl_core`` over the kernel's websocket channel,
the path a browser takes. The server is stopped by its PID (terminate, then kill if it does not exit).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jupyterlab")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1"}
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ip={HOST}", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={NOTEBOOK_DIR}", "--LabApp.extension_manager=readonly"]
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
