"""The proxies under comparison, each started in its own process tree on a chosen CPU set.

* ``CocalcProxy``: ``twistd -n cocalcproxy`` with its own state directory, a user, a project on
  127.0.0.1 and an API token; requests carry ``Authorization: Bearer``.
* ``CHP``: configurable-http-proxy (JupyterHub's proxy), ``CHP_VERSION`` from npm, installed by
  the benchmark into ``bench/.peers/`` (ignored by git); it terminates TLS itself
  (``--ssl-key``/``--ssl-cert``); no authentication.
* ``Nginx``: the Debian package's binary with a configuration written into a temporary
  directory, run in the foreground with its own pid and error-log paths (``/etc/nginx`` is never
  read or touched); one worker process; no authentication.

All three use the same certificate (cocalcproxy's, generated at its start) and the same backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from measure import ProcStat, descendants, parse_stat

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PEERS_DIR = ROOT / "bench" / ".peers"
CHP_VERSION = "5.3.0"
WS_PATH = "ws"


def child_env() -> dict[str, str]:
    """This checkout first on sys.path, so its package and twistd plugin are the ones used."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COCALCPROXY_STATE_DIR", "STATE_DIRECTORY", "NOTIFY_SOCKET", "LISTEN_FDS")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def all_stats() -> list[ProcStat]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stats.append(parse_stat(Path(f"/proc/{entry}/stat").read_text()))
    return stats


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - not yet
            last = e
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what} (last error: {last!r})")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def https_status(url: str, cafile: str, headers: dict[str, str] | None = None) -> int:
    import ssl

    context = ssl.create_default_context(cafile=cafile)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@dataclass
class Backend:
    port: int
    ws_port: int
    process: subprocess.Popen[bytes]


def start_backend(cpus: str | None) -> Backend:
    process = subprocess.Popen(
        pinned(cpus, [sys.executable, str(ROOT / "bench" / "backend.py")]),
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    ports = {}
    for _ in range(2):
        name, _, value = process.stdout.readline().decode().partition(" ")
        if name not in ("PORT", "WSPORT"):
            stop_process(process)
            raise SystemExit("the benchmark backend did not start")
        ports[name] = int(value)
    return Backend(ports["PORT"], ports["WSPORT"], process)


STATIC_BACKEND_CONF = """\
# Written by cocalcproxy's bench/peers.py: a static backend for the workers scenario.
{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        default_type text/plain;
        # 13 bytes, as bench/backend.py's /small.
        location / {{ return 200 "hello, world\\n"; }}
    }}
}}
"""


def start_static_backend(work: Path, ws_port: int, cpus: str | None) -> Backend:
    """nginx answering every GET with a fixed 13-byte body over plain HTTP/1.1 keep-alive: a
    backend that costs a few microseconds per request (bench/backend.py, in Python, costs
    about a third of what the proxy does), so that on a small machine the proxy, not the
    backend, is what more workers have to share the cores with. ``ws_port`` is carried over
    (this backend has no WebSocket server)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        STATIC_BACKEND_CONF.format(
            user="user root root;" if os.geteuid() == 0 else "", work=work, port=port
        )
    )
    log = open(work / "nginx.out", "wb")  # noqa: SIM115
    command = ["nginx", "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")]
    process = subprocess.Popen(pinned(cpus, command), stdout=log, stderr=log)
    log.close()

    def ready() -> bool:
        if process.poll() is not None:
            raise SystemExit(f"the static nginx backend exited: {(work / 'error.log').read_text()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/small", timeout=5) as response:
            return bool(response.status == 200)

    wait_until(ready, 60, "the static nginx backend to answer")
    return Backend(port, ws_port, process)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Peer:
    """One running proxy. ``path(p)`` is the URL path that reaches the backend's ``/p``."""

    name: str
    label: str
    port: int
    cert: str
    process: subprocess.Popen[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def path(self, backend_path: str) -> str:
        raise NotImplementedError

    def ws_path(self) -> str:
        raise NotImplementedError

    def url(self, backend_path: str) -> str:
        return f"https://localhost:{self.port}{self.path(backend_path)}"

    def ws_url(self) -> str:
        return f"wss://localhost:{self.port}{self.ws_path()}"

    def header_lines(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.headers.items()]

    def pids(self) -> set[int]:
        """The whole process tree: nginx's master and workers, or a proxy's worker processes."""
        return descendants(self.pid, all_stats())

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def output(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise SystemExit(f"{self.label} exited; its output:\n{self.output()}")


# -- cocalcproxy --------------------------------------------------------------------------------


def admin(*args: str, stdin: str | None = None) -> str:
    """The ``cocalcproxy`` admin command; its last line of output."""
    lines = admin_output(*args, stdin=stdin).strip().splitlines()
    return lines[-1] if lines else ""


def admin_output(*args: str, stdin: str | None = None) -> str:
    """The ``cocalcproxy`` admin command; all of its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "cocalcproxy.ops.admin", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=120,
    )
    if result.returncode != 0:
        raise SystemExit(f"cocalcproxy {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def twistd_command() -> list[str]:
    twistd = BIN / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def compile_checkout() -> None:
    """Byte-compile this checkout's package and twistd plugin (``__pycache__``, ignored by git),
    as installing a package does. Without it, and with ``PYTHONDONTWRITEBYTECODE`` set (as on
    the build machine), every proxy process compiles the package from source at start-up,
    which leaves it about 1 MiB larger at rest than an installed proxy."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "cocalcproxy"),
         str(ROOT / "twisted" / "plugins")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


def has_workers_option() -> bool:
    """Whether this checkout's cocalcproxy has ``--workers`` (issue 10's worker processes)."""
    result = subprocess.run(
        [*twistd_command(), "cocalcproxy", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=120,
    )
    return re.search(r"--workers\b", result.stdout) is not None


@dataclass
class CocalcProxy(Peer):
    project_id: str = ""
    backend_port: int = 0
    ws_port: int = 0

    extra: list[str] = field(default_factory=list)

    def path(self, backend_path: str) -> str:
        return f"/{self.project_id}/server/{self.backend_port}/{backend_path}"

    def metrics_port(self) -> int:
        """The port of its ``--metrics tcp:PORT:...`` listener (given in ``extra``)."""
        for option, value in zip(self.extra, self.extra[1:], strict=False):
            if option == "--metrics":
                return int(value.split(":")[1])
        raise SystemExit(f"{self.label} has no --metrics listener")

    def ws_path(self) -> str:
        return f"/{self.project_id}/port/{self.ws_port}/{WS_PATH}"


def start_cocalcproxy(
    state_dir: Path,
    backend: Backend,
    cpus: str | None,
    extra: list[str],
    database: str | None = None,
    project_id: str | None = None,
    label: str = "cocalcproxy",
    profile: str | None = None,
    launcher: list[str] | None = None,
) -> CocalcProxy:
    """A fresh proxy with its own state directory and an API token for user ``bench``. Without
    ``database``, a new SQLite directory with that user and a project; with it, the user and
    the project (``project_id``) must already be there (several proxies share them).
    ``launcher`` goes in front of twistd's command line (bench/instructions.py: valgrind)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    where = ["--database", database] if database else ["--state-dir", str(state_dir)]
    if project_id is None:
        admin(*where, "init")
        admin(*where, "user", "add", "bench", "--password-stdin", stdin="bench-pw-not-secret\n")
        project_id = admin(*where, "project", "add", "--owner", "bench", "--host", "127.0.0.1")
    token = admin(*where, "token", "create", "bench")
    port = free_port()
    log_path = state_dir / "proxy.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed when the process is
    command = [
        *(launcher or []),
        *twistd_command(),
        "-n",
        "--pidfile=",
        *(["--profile", profile, "--profiler", "cprofile", "--savestats"] if profile else []),
        "cocalcproxy",
        "--state-dir",
        str(state_dir),
        *(["--database", database] if database else []),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--access-log",
        str(state_dir / "access.log"),
        *extra,
    ]
    process = subprocess.Popen(
        pinned(cpus, command), cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    cert = str(state_dir / "tls" / "cert.pem")
    peer = CocalcProxy(
        name="cocalcproxy",
        label=label,
        port=port,
        cert=cert,
        process=process,
        headers={"Authorization": f"Bearer {token}"},
        log_path=log_path,
        project_id=project_id,
        backend_port=backend.port,
        ws_port=backend.ws_port,
        extra=list(extra),
    )

    def ready() -> bool:
        peer.check_alive()
        return os.path.exists(cert) and https_status(peer.url("small"), cert, peer.headers) == 200

    wait_until(ready, 90, f"{label} to answer")
    return peer


# -- configurable-http-proxy --------------------------------------------------------------------


def chp_script() -> Path:
    return (
        PEERS_DIR / "node_modules" / "configurable-http-proxy" / "bin" / "configurable-http-proxy"
    )


def install_chp() -> str:
    """Install configurable-http-proxy CHP_VERSION into bench/.peers (once); its version."""
    package = PEERS_DIR / "node_modules" / "configurable-http-proxy" / "package.json"
    if package.exists() and json.loads(package.read_text()).get("version") == CHP_VERSION:
        return CHP_VERSION
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    print(f"installing configurable-http-proxy {CHP_VERSION} into {PEERS_DIR} ...", flush=True)
    result = subprocess.run(
        [
            "npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(PEERS_DIR),
            f"configurable-http-proxy@{CHP_VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    if result.returncode != 0 or not package.exists():
        raise SystemExit(f"npm install configurable-http-proxy failed: {result.stderr[-2000:]}")
    return CHP_VERSION


@dataclass
class CHP(Peer):
    def path(self, backend_path: str) -> str:
        return f"/chp/{backend_path}"

    def ws_path(self) -> str:
        return f"/{WS_PATH}/echo"


def start_chp(
    work: Path, backend: Backend, cpus: str | None, cert: str, key: str, version: str
) -> CHP:
    port, api_port = free_port(), free_port()
    token = os.urandom(16).hex()
    log_path = work / "chp.log"
    log = open(log_path, "wb")  # noqa: SIM115
    command = [
        "node", str(chp_script()),
        "--ip", "127.0.0.1", "--port", str(port),
        "--api-ip", "127.0.0.1", "--api-port", str(api_port),
        "--default-target", f"http://127.0.0.1:{backend.port}",
        "--ssl-key", key, "--ssl-cert", cert,
    ]  # fmt: skip
    env = dict(os.environ, CONFIGPROXY_AUTH_TOKEN=token)
    process = subprocess.Popen(pinned(cpus, command), env=env, stdout=log, stderr=log)
    log.close()
    peer = CHP(
        name="chp",
        label=f"configurable-http-proxy {version}",
        port=port,
        cert=cert,
        process=process,
        log_path=log_path,
    )

    def ready() -> bool:
        peer.check_alive()
        return https_status(peer.url("small"), cert) == 200

    wait_until(ready, 60, "configurable-http-proxy to answer")
    # The WebSocket echo server is on its own port: a route for /ws (CHP's REST API).
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/routes/{WS_PATH}",
        data=json.dumps({"target": f"http://127.0.0.1:{backend.ws_port}"}).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        if response.status not in (200, 201):
            raise SystemExit(f"configurable-http-proxy refused the /ws route: {response.status}")
    return peer


# -- nginx --------------------------------------------------------------------------------------


def nginx_version() -> str:
    result = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=30)
    m = re.search(r"nginx/([\w.]+)", result.stderr + result.stdout)
    return m.group(1) if m else "?"


NGINX_CONF = """\
# Written by cocalcproxy's bench/peers.py for one benchmark run.
{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    upstream websocket {{ server 127.0.0.1:{ws}; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        keepalive_requests 1000000;
        client_max_body_size 0;
        # Stream both ways, as the other two do.
        proxy_buffering off;
        proxy_request_buffering off;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location /{ws_path} {{
            proxy_pass http://websocket;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


@dataclass
class Nginx(Peer):
    def path(self, backend_path: str) -> str:
        return f"/{backend_path}"

    def ws_path(self) -> str:
        return f"/{WS_PATH}/echo"

    def stop(self) -> None:
        # SIGQUIT: graceful stop of master and workers (SIGTERM is nginx's fast stop).
        if self.process is not None:
            stop_process(self.process, signal.SIGQUIT)


def start_nginx(
    work: Path, backend: Backend, cpus: str | None, cert: str, key: str, version: str
) -> Nginx:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            # As root, nginx's workers would run as "nobody", who cannot use these files.
            user="user root root;" if os.geteuid() == 0 else "",
            work=work,
            backend=backend.port,
            ws=backend.ws_port,
            port=port,
            cert=cert,
            key=key,
            ws_path=WS_PATH,
        )
    )
    log_path = work / "nginx.out"
    log = open(log_path, "wb")  # noqa: SIM115
    # -e: the error log before the configuration is read (else /var/log/nginx/error.log).
    command = ["nginx", "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")]
    process = subprocess.Popen(pinned(cpus, command), stdout=log, stderr=log)
    log.close()
    peer = Nginx(
        name="nginx", label=f"nginx {version}", port=port, cert=cert, process=process,
        log_path=work / "error.log",
    )  # fmt: skip

    def ready() -> bool:
        peer.check_alive()
        return https_status(peer.url("small"), cert) == 200

    wait_until(ready, 60, "nginx to answer")
    return peer
