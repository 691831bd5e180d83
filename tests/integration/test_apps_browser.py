"""The apps people run, through the proxy in headless Chromium (issue #14): JupyterLab (its UI
loads, and a kernel runs code over its WebSocket) and Streamlit (a page drawn over its
WebSocket, and a button press sent back over it), each in the port form with the app's base-URL
option and on a project subdomain with no option at all.

The command lines are the user guide's recipes. The apps come from the test extra (pinned in
setup.py), so the README's test command installs them. Everything polls with deadlines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from tests.integration.test_browser import WebDriver
from tests.processes import GiveUp, ProxyProcess, admin, free_port, wait_for

DOMAIN = "apps.test"
PASSWORD = "correct horse"

# Runs in the JupyterLab page: start a kernel through the REST API (the page's own _xsrf cookie,
# as JupyterLab does), send an execute_request over the kernel's WebSocket, and hand back what
# the kernel printed.
KERNEL_ROUND_TRIP = r"""
const done = arguments[arguments.length - 1];
const base = arguments[0];
const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
(async () => {
  const response = await fetch(base + "api/kernels", {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-XSRFToken": decodeURIComponent(xsrf)},
    body: JSON.stringify({name: "python3"}),
  });
  if (!response.ok) { done("kernel start: HTTP " + response.status); return; }
  const kernel = await response.json();
  const url = new URL(base + "api/kernels/" + kernel.id + "/channels", location.href);
  url.protocol = url.protocol.replace("http", "ws");
  const ws = new WebSocket(url.href);
  const session = Math.random().toString(36).slice(2);
  ws.onerror = () => done("websocket error");
  ws.onopen = () => ws.send(JSON.stringify({
    header: {msg_id: "run-1", msg_type: "execute_request", session: session,
             username: "test", version: "5.3", date: new Date().toISOString()},
    parent_header: {}, metadata: {}, channel: "shell", buffers: [],
    content: {code: "print(6 * 7, 'from the kernel')", silent: false, store_history: false,
              user_expressions: {}, allow_stdin: false, stop_on_error: true},
  }));
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.msg_type === "stream" && message.parent_header.msg_id === "run-1") {
      ws.close();
      done("printed: " + message.content.text.trim());
    }
  };
})().catch((e) => done("failed: " + e));
"""

STREAMLIT_APP = """
import streamlit as st

st.title("Hello from Streamlit")
if st.button("Press me"):
    st.write("The button was pressed")
"""


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


class AppsInABrowser(unittest.TestCase):
    """One proxy with subdomains; alice owns a project on 127.0.0.1; one browser."""

    def setUp(self) -> None:
        self.state = str(Path(self.mktemp()).absolute())
        Path(self.state).mkdir(parents=True)
        done = admin(self.state, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        done = admin(self.state, "project", "add", "--owner", "alice")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.pid = done.stdout.strip().splitlines()[-1]
        self.proxy = ProxyProcess(self.state, "--project-domain", DOMAIN).start()
        self.addCleanup(self.proxy.stop)
        self.proxy.wait_listening()
        self.browser = WebDriver(self, (f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",))
        self.browser.set_script_timeout(60)
        self.home = Path(tempfile.mkdtemp(prefix="cocalcproxy-app-"))

    def start_app(self, port: int, *command: str) -> None:
        """Run ``python -m <command>`` with a home of its own; stopped at cleanup."""
        env = {
            **os.environ,
            "HOME": str(self.home),
            "JUPYTER_CONFIG_DIR": str(self.home / "jupyter-config"),
            "JUPYTER_DATA_DIR": str(self.home / "jupyter-data"),
            "JUPYTER_RUNTIME_DIR": str(self.home / "jupyter-runtime"),
            "PYTHONPATH": "",
        }
        log = open(self.home / "app.log", "wb")  # noqa: SIM115 - closed at cleanup
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

        def ready() -> bool:
            if process.poll() is not None:
                raise GiveUp(f"{command[0]} exited:\n{self.app_log()}")
            return listening(port)

        wait_for(ready, 120, f"{command[0]} to listen on {port}")

    def app_log(self) -> str:
        return (self.home / "app.log").read_text(errors="replace")[-4000:]

    def sign_in_at(self, url: str) -> None:
        """Open ``url`` signed out, sign in on the main host (through the hop for a subdomain),
        and wait to be back at ``url``."""
        self.browser.go(url)
        wait_for(lambda: "/_/login" in self.browser.url, 60, "the sign-in page")
        self.browser.type("#name", "alice")
        self.browser.type("#password", PASSWORD)
        self.browser.click("button[type=submit]")
        try:
            wait_for(lambda: self.browser.url.startswith(url), 60, f"{url} after signing in")
        except AssertionError as e:
            raise AssertionError(f"{e}\nat {self.browser.url}\n{self.proxy.output()[-3000:]}")

    def wait_in_page(self, script: str, timeout: float, what: str) -> object:
        def check() -> object:
            return self.browser.execute(script)

        try:
            return wait_for(check, timeout, what)
        except AssertionError as e:
            detail = f"{e}\nat {self.browser.url}\napp log:\n{self.app_log()}"
            raise AssertionError(detail) from None

    # -- JupyterLab ---------------------------------------------------------------------------

    def jupyter(self, port: int, base_url: str) -> None:
        self.start_app(
            port,
            "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            f"--ServerApp.base_url={base_url}", "--ServerApp.allow_remote_access=True",
            "--IdentityProvider.token=", f"--ServerApp.root_dir={self.home}",
            *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
        )  # fmt: skip

    def check_jupyterlab(self, url: str, base: str) -> None:
        self.sign_in_at(url)
        self.wait_in_page(
            "return !!document.querySelector('.jp-LabShell #jp-main-dock-panel')",
            120,
            "JupyterLab's shell (every script and style through the proxy)",
        )
        printed = self.browser.execute_async(KERNEL_ROUND_TRIP, base)
        self.assertEqual(printed, "printed: 42 from the kernel", self.app_log())

    def test_jupyterlab_port_form(self) -> None:
        port = free_port()
        base = f"/{self.pid}/port/{port}/"
        self.jupyter(port, base)
        self.check_jupyterlab(f"{self.proxy.url}{base}lab", base)

    def test_jupyterlab_subdomain(self) -> None:
        port = free_port()
        self.jupyter(port, "/")
        self.check_jupyterlab(f"https://{self.pid}-{port}.{DOMAIN}:{self.proxy.port}/lab", "/")

    # -- Streamlit ----------------------------------------------------------------------------

    def streamlit(self, port: int, *options: str) -> None:
        (self.home / "app.py").write_text(STREAMLIT_APP)
        self.start_app(
            port,
            "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
            "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", *options,
        )  # fmt: skip

    def check_streamlit(self, url: str) -> None:
        self.sign_in_at(url)
        self.wait_in_page(
            "return document.body.innerText.includes('Hello from Streamlit')",
            120,
            "the page Streamlit draws over its WebSocket",
        )
        self.wait_in_page(
            "const b = [...document.querySelectorAll('button')]"
            ".find(b => b.innerText.includes('Press me')); if (b) { b.click(); } return !!b;",
            60,
            "the button",
        )
        self.wait_in_page(
            "return document.body.innerText.includes('The button was pressed')",
            60,
            "the app's answer to the press, back over the WebSocket",
        )

    def test_streamlit_port_form(self) -> None:
        port = free_port()
        base = f"/{self.pid}/port/{port}"
        self.streamlit(port, "--server.baseUrlPath", base)
        self.check_streamlit(f"{self.proxy.url}{base}/")

    def test_streamlit_subdomain(self) -> None:
        port = free_port()
        self.streamlit(port)
        self.check_streamlit(f"https://{self.pid}-{port}.{DOMAIN}:{self.proxy.port}/")
