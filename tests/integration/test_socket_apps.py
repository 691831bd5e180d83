"""The user guide's socket-folder recipes, run for real (issue 16): Jupyter (``--ServerApp.sock``),
uvicorn (``--uds``) and gunicorn with Flask (``--bind unix:``) listen on ``<folder>/<port>``, and
the proxy serves them to the project's owner with no TCP port involved. The apps come from the
test extra (pinned in setup.py)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.processes import GiveUp, wait_for
from tests.support import https_client, start_proxy

ASGI_APP = """
async def app(scope, receive, send):
    assert scope["type"] == "http"
    body = f"uvicorn {scope['root_path']} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
"""

FLASK_APP = """
from flask import Flask, request
app = Flask(__name__)

@app.route("/<path:rest>")
def hello(rest):
    return f"gunicorn {request.script_root} /{rest}"
"""


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


class SocketAppsTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.proxy = yield start_proxy(self)
        yield self.proxy.directory.add_user("alice", "alice-password")
        # A short folder (AF_UNIX names are at most 107 bytes), writable by its owner only.
        self.folder = tempfile.mkdtemp(prefix="cp-apps-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.folder, True)
        os.chmod(self.folder, 0o700)
        self.home = Path(tempfile.mkdtemp(prefix="cp-apps-home-"))
        self.addCleanup(shutil.rmtree, self.home, True)
        # TEST-NET-1 as the host: nothing there answers, so whatever is served came over a socket.
        project = yield self.proxy.directory.add_project(
            "alice", host="192.0.2.1", socket_dir=self.folder
        )
        self.pid = project.id
        self.http = https_client(self, self.proxy.cert_path)

    def start_app(self, socket_name: str, *command: str) -> defer.Deferred[None]:
        """``python -m <command>`` in the project's home; returns once the socket exists."""
        env = {
            **os.environ,
            "HOME": str(self.home),
            "JUPYTER_CONFIG_DIR": str(self.home / "jupyter-config"),
            "JUPYTER_DATA_DIR": str(self.home / "jupyter-data"),
            "JUPYTER_RUNTIME_DIR": str(self.home / "jupyter-runtime"),
            "PYTHONPATH": str(self.home),
        }
        log = open(self.home / f"{socket_name}.log", "wb")  # noqa: SIM115 - closed at cleanup
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [sys.executable, "-m", *command],
            cwd=self.home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def stop() -> None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

        self.addCleanup(stop)
        path = os.path.join(self.folder, socket_name)

        def ready() -> bool:
            if process.poll() is not None:
                log_text = (self.home / f"{socket_name}.log").read_text(errors="replace")
                raise GiveUp(f"{command[0]} exited:\n{log_text[-3000:]}")
            return os.path.exists(path)

        waiting: defer.Deferred[None] = deferToThread(
            wait_for, ready, 120, f"{command[0]} to listen on {path}"
        )
        return waiting

    @defer.inlineCallbacks
    def get(self, path: str):  # type: ignore[no-untyped-def]
        response = yield self.http.get(
            self.proxy.url + path, headers={"Authorization": basic("alice", "alice-password")}
        )
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def test_uvicorn_uds(self):  # type: ignore[no-untyped-def]
        (self.home / "main.py").write_text(ASGI_APP)
        prefix = f"/{self.pid}/server/8000"
        yield self.start_app(
            "8000", "uvicorn", "main:app", "--uds", f"{self.folder}/8000", "--root-path", prefix
        )
        code, body = yield self.get(f"{prefix}/items")
        # The app is told its prefix (root_path); uvicorn puts it in front of the path, as the
        # ASGI spec has it, and frameworks (FastAPI/Starlette) route on what follows it.
        self.assertEqual((code, body), (200, f"uvicorn {prefix} {prefix}/items".encode()))

    @defer.inlineCallbacks
    def test_gunicorn_flask_bind_unix(self):  # type: ignore[no-untyped-def]
        (self.home / "app.py").write_text(FLASK_APP)
        yield self.start_app(
            "8001", "gunicorn", "--bind", f"unix:{self.folder}/8001", "--umask", "007", "app:app"
        )
        code, body = yield self.get(f"/{self.pid}/server/8001/hello")
        self.assertEqual((code, body), (200, b"gunicorn  /hello"))

    @defer.inlineCallbacks
    def test_jupyter_sock(self):  # type: ignore[no-untyped-def]
        base = f"/{self.pid}/port/8888/"
        yield self.start_app(
            "8888",
            "jupyter", "lab", "--no-browser", f"--ServerApp.sock={self.folder}/8888",
            "--ServerApp.sock_mode=0660", f"--ServerApp.base_url={base}",
            "--IdentityProvider.token=", f"--ServerApp.root_dir={self.home}",
            *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
        )  # fmt: skip
        code, body = yield self.get(f"{base}api/status")
        self.assertEqual(code, 200, body[:500])
        self.assertIn(b'"started"', body)
        code, body = yield self.get(f"{base}lab")
        self.assertEqual(code, 200, body[:500])
        self.assertIn(b"JupyterLab", body)
