"""Several machines behind a real load balancer (issue #10): HAProxy in TCP mode (TLS passed
through) in front of two proxies, each its own process (``twistd -n cocalcproxy``), on one fresh
PostgreSQL database, with a real HTTP backend.

The two proxies stand for two machines: each listens on the same port on its own loopback address
(127.0.0.2 and 127.0.0.3, as two machines would both listen on 443), HAProxy on 127.0.0.1 and that
port; each proxy has its own state directory, so everything they agree on comes through the
directory. The client resolves every name to the address it is told (one proxy, the other, or
HAProxy), sends SNI and Host for that name, and keeps cookies per host like a browser.
"""

from __future__ import annotations

import base64
import http.client
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from twisted.trial import unittest

from cocalcproxy.guard.ratelimit import PER_ADDRESS
from cocalcproxy.ops import tls
from tests.directory_support import new_postgres_url
from tests.integration.test_revocation_notify import http_ok, listener_pids, run_admin
from tests.processes import ProxyProcess, wait_for

DOMAIN = "proj.test"
HOSTNAME = "localhost"
BALANCER = "127.0.0.1"
MACHINES = ("127.0.0.2", "127.0.0.3")
REVOCATION_CONTRACT = 2.0  # seconds: the contract's bound for an admin change to take effect


def shared_free_port() -> int:
    """A port free on the balancer's address and on both machines' addresses."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((BALANCER, 0))
            port: int = s.getsockname()[1]
            free = True
            for address in MACHINES:
                with socket.socket() as other:
                    try:
                        other.bind((address, port))
                    except OSError:
                        free = False
            if free:
                return port
    raise AssertionError("no port free on every loopback address")


class Answer:
    def __init__(self, response: http.client.HTTPResponse, body: bytes) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = body

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


class Browser:
    """One HTTPS request per connection, sent to ``address`` whatever the URL's host; cookies
    kept per host (host-only, as the proxy sets them)."""

    def __init__(self, port: int, cafile: str, source: str | None = None) -> None:
        self.port = port
        self.source = source
        self.context = ssl.create_default_context(cafile=cafile)
        self.jar: dict[str, dict[str, str]] = {}

    def request(
        self,
        address: str,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        keep_cookies: bool = True,
    ) -> Answer:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 443
        source = (self.source, 0) if self.source is not None else None
        sock = socket.create_connection((address, self.port), timeout=10, source_address=source)
        conn = http.client.HTTPSConnection(host, port, context=self.context, timeout=10)
        conn.sock = self.context.wrap_socket(sock, server_hostname=host)
        try:
            sent = {"Accept": "text/html", "Connection": "close", **(headers or {})}
            cookies = self.jar.get(host, {})
            if cookies:
                sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(method, target, body=body, headers=sent)
            response = conn.getresponse()
            answer = Answer(response, response.read())
        finally:
            conn.close()
        if keep_cookies:
            for line in answer.headers.get_all("Set-Cookie") or []:
                name, _, value = line.split(";", 1)[0].partition("=")
                if "max-age=0" in line.lower():
                    self.jar.get(host, {}).pop(name, None)
                else:
                    self.jar.setdefault(host, {})[name] = value
        return answer


class Balancer:
    """HAProxy in the foreground with its configuration in a temporary folder."""

    def __init__(
        self, folder: Path, port: int, socket_folder: Path, proxy_protocol: bool = False
    ) -> None:
        self.folder = folder
        # A Unix socket path must be short (HAProxy: 97 bytes): in its own /tmp folder.
        self.socket_path = socket_folder / "haproxy.sock"
        servers = "\n".join(
            f"    server machine{i} {address}:{port}" for i, address in enumerate(MACHINES, 1)
        )
        self.config = folder / "haproxy.cfg"
        self.config.write_text(
            f"""global
    stats socket {self.socket_path} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend https
    bind {BALANCER}:{port}
    default_backend proxies

backend proxies
    balance roundrobin
    option redispatch 1
    retries 3
    option httpchk
    http-check send meth GET uri /_/health ver HTTP/1.1 hdr Host {HOSTNAME}
    http-check expect status 200
    default-server check check-ssl verify none check-sni {HOSTNAME} inter 200ms fall 1 rise 1{
                " send-proxy-v2 check-send-proxy" if proxy_protocol else ""
            }
{servers}
"""
        )
        self.log = folder / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        checked = subprocess.run(
            [haproxy, "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [haproxy, "-db", "-f", str(self.config)], stdout=log, stderr=log
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it (UP, DOWN, ...), from its stats socket."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.log.read_text(errors='replace')}")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {
            r["svname"]: r["status"].split()[0]
            for r in rows
            if r.get("pxname") == "proxies" and r["svname"].startswith("machine")
        }


class BehindHAProxy(unittest.TestCase):
    #: HAProxy sends the PROXY protocol (v2) and the proxies listen with ``haproxy:tcp:...``.
    proxy_protocol = False
    #: Worker processes per proxy (--workers).
    workers = 1

    def setUp(self) -> None:
        self.url = new_postgres_url(self)
        run_admin(self.url, "init")
        run_admin(self.url, "user", "add", "alice", "--password-stdin", stdin="alice-pw\n")
        run_admin(self.url, "user", "add", "bob", "--password-stdin", stdin="bob-pw\n")
        self.pid = run_admin(self.url, "project", "add", "--owner", "alice")["id"]
        run_admin(self.url, "project", "collaborator", "add", self.pid, "bob")
        self.backend_port = self.start_backend()
        self.port = shared_free_port()
        # One certificate for every machine (the balancer passes TLS through).
        material = Path(self.mktemp()).absolute()
        cert, key = tls.ensure_self_signed(str(material), HOSTNAME, DOMAIN)
        self.cafile = cert
        self.proxies: list[ProxyProcess] = []
        for address in MACHINES:
            proxy = ProxyProcess(
                str(Path(self.mktemp()).absolute()),
                "--database", self.url,
                "--hostname", HOSTNAME,
                "--project-domain", DOMAIN,
                "--tls-cert", cert,
                "--tls-key", key,
                "--workers", str(self.workers),
                port=self.port,
                interface=address,
            )  # fmt: skip
            if self.proxy_protocol:
                proxy.argv = [
                    "haproxy:" + a if a.startswith(f"tcp:{self.port}:") else a for a in proxy.argv
                ]
            proxy.start()
            self.addCleanup(proxy.stop)
            self.proxies.append(proxy)
        for proxy in self.proxies:
            proxy.wait_listening()
        wait_for(
            lambda: len(listener_pids(self.url)) == len(MACHINES) * self.workers,
            60,
            "every worker of both proxies to LISTEN",
        )
        folder = Path(self.mktemp()).absolute()
        folder.mkdir(parents=True)
        socket_folder = Path(tempfile.mkdtemp(prefix="ccp-lb-"))
        self.addCleanup(shutil.rmtree, socket_folder, True)
        self.balancer = Balancer(folder, self.port, socket_folder, self.proxy_protocol)
        self.balancer.start()
        self.addCleanup(self.balancer.stop)
        wait_for(
            lambda: set(self.balancer.states().values()) == {"UP"},
            30,
            "HAProxy to see both proxies up",
        )
        self.browser = Browser(self.port, self.cafile)

    def start_backend(self) -> int:
        served = Path(self.mktemp())
        served.mkdir(parents=True)
        (served / "index.html").write_text("hello from the project\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        backend = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=served,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (backend.terminate(), backend.wait(timeout=30)))
        wait_for(lambda: http_ok(port), 30, "the HTTP backend")
        return port

    # -- helpers --------------------------------------------------------------------------------

    @property
    def main(self) -> str:
        return f"https://{HOSTNAME}:{self.port}"

    @property
    def sub_host(self) -> str:
        return f"{self.pid}-{self.backend_port}.{DOMAIN}"

    @property
    def sub(self) -> str:
        return f"https://{self.sub_host}:{self.port}"

    def project_path(self) -> str:
        return f"/{self.pid}/server/{self.backend_port}/"

    def sign_in(self, form_from: str, post_to: str, name: str, password: str) -> Answer:
        form = self.browser.request(form_from, "GET", self.main + "/_/login")
        self.assertEqual(form.status, 200)
        match = re.search(rb'name="csrf" value="([^"]+)"', form.body)
        assert match is not None, form.body[:2000]
        body = urlencode(
            {"csrf": match.group(1).decode(), "name": name, "password": password, "next": "/"}
        ).encode()
        return self.browser.request(
            post_to,
            "POST",
            self.main + "/_/login",
            body=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": self.main,
            },
        )

    # -- the tests ------------------------------------------------------------------------------

    def test_sign_in_hop_removal_and_failover(self) -> None:
        one, two = MACHINES
        # The sign-in form from one machine, posted to the other: the CSRF key is shared.
        signed_in = self.sign_in(one, two, "bob", "bob-pw")
        self.assertEqual((signed_in.status, signed_in.location), (303, "/"), signed_in.body[:500])
        self.assertIn("__Host-cocalcproxy_session", self.browser.jar[HOSTNAME])
        # The session made on one machine works on the other, and through the balancer.
        for address in (one, two, BALANCER, BALANCER):
            answer = self.browser.request(address, "GET", self.main + self.project_path())
            self.assertEqual(answer.status, 200, address)
            self.assertIn(b"hello from the project", answer.body)

        # The sign-in hop to a project subdomain, every step on an alternating machine.
        start = self.browser.request(one, "GET", self.sub + "/")
        self.assertEqual(start.status, 302)
        self.assertTrue(start.location.startswith(self.main + "/_/hop?"), start.location)
        hop = self.browser.request(two, "GET", start.location)
        self.assertEqual(hop.status, 302, hop.body[:500])
        landing = hop.location
        self.assertTrue(landing.startswith(self.sub + "/.cocalcproxy/hop?"), landing)
        ticket = parse_qs(urlsplit(landing).query)["ticket"][0]
        landed = self.browser.request(one, "GET", landing)
        self.assertEqual((landed.status, landed.location), (302, "/"), landed.body[:500])
        # The same ticket again, on the other machine: refused (single use across both), and
        # no cookie for it.
        replay = self.browser.request(two, "GET", landing, keep_cookies=False)
        self.assertEqual(replay.status, 403)
        self.assertIsNone(replay.headers.get("Set-Cookie"))
        self.assertIn(quote(ticket, safe=""), landing)
        # The subdomain's cookie (tagged with the shared key) works on both machines.
        for address in (two, one, BALANCER):
            answer = self.browser.request(address, "GET", self.sub + "/")
            self.assertEqual(answer.status, 200, address)
            self.assertIn(b"hello from the project", answer.body)

        # A collaborator removal with the admin command cuts access on both machines (main host
        # and subdomain) within the contract's 2 s.
        run_admin(self.url, "project", "collaborator", "remove", self.pid, "bob")
        removed = time.monotonic()
        cut: dict[tuple[str, str], float] = {}
        targets = [(a, u) for a in (one, two) for u in (self.main + self.project_path(), self.sub)]
        while len(cut) < len(targets) and time.monotonic() < removed + 10:
            for address, url in targets:
                if (address, url) not in cut:
                    answer = self.browser.request(address, "GET", url, keep_cookies=False)
                    if answer.status != 200:
                        cut[(address, url)] = time.monotonic() - removed
        self.assertEqual(len(cut), len(targets), "a machine kept serving a removed collaborator")
        self.assertLess(max(cut.values()), REVOCATION_CONTRACT, cut)
        for address in (one, two):
            answer = self.browser.request(address, "GET", self.main + self.project_path())
            self.assertEqual(answer.status, 404)

        # One machine dies (SIGKILL): new requests through the balancer go on via the other.
        run_admin(self.url, "project", "collaborator", "add", self.pid, "bob")
        wait_for(
            lambda: all(
                self.browser.request(a, "GET", self.main + self.project_path()).status == 200
                for a in (one, two)
            ),
            10,
            "bob to be a collaborator again on both machines",
        )
        killed = self.proxies[0]
        assert killed.process is not None
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(timeout=30)
        statuses = [
            self.browser.request(BALANCER, "GET", self.main + self.project_path()).status
            for _ in range(10)
        ]
        self.assertEqual(statuses, [200] * 10)
        wait_for(
            lambda: self.balancer.states() == {"machine1": "DOWN", "machine2": "UP"},
            10,
            "HAProxy to take the dead machine out",
        )
        for _ in range(4):
            answer = self.browser.request(BALANCER, "GET", self.sub + "/")
            self.assertEqual(answer.status, 200)
        # A new sign-in through the balancer works with one machine left.
        self.browser.jar.clear()
        again = self.sign_in(BALANCER, BALANCER, "alice", "alice-pw")
        self.assertEqual((again.status, again.location), (303, "/"))

    def test_ten_bad_guesses_spread_across_the_machines_count_together(self) -> None:
        # Ten wrong passwords for one name, five on each machine: the eleventh attempt, even
        # with the right password, is refused by both (each alone has seen only five).
        def attempt(address: str, password: str) -> Answer:
            credentials = base64.b64encode(f"alice:{password}".encode()).decode()
            return self.browser.request(
                address,
                "GET",
                self.main + self.project_path(),
                headers={"Authorization": f"Basic {credentials}", "Accept": "*/*"},
                keep_cookies=False,
            )

        for i in range(10):
            self.assertEqual(attempt(MACHINES[i % 2], f"wrong-{i}").status, 401, i)
        for address in (*MACHINES, BALANCER):
            refused = attempt(address, "alice-pw")
            self.assertEqual(refused.status, 429, address)
            self.assertTrue(refused.headers.get("Retry-After"), address)

    def test_the_per_address_limit_sees_what_the_balancer_passes_on(self) -> None:
        # One client guesses at many names until its address is limited. With the PROXY
        # protocol the proxies see each client's own address: another client, through the same
        # balancer, still signs in. Without it every client is the balancer's address, and the
        # other client is limited too (as the operator guide says).
        guesser = Browser(self.port, self.cafile, source="127.0.0.9")
        other = Browser(self.port, self.cafile, source="127.0.0.10")

        def attempt(browser: Browser, name: str, password: str) -> int:
            credentials = base64.b64encode(f"{name}:{password}".encode()).decode()
            return browser.request(
                BALANCER,
                "GET",
                self.main + self.project_path(),
                headers={"Authorization": f"Basic {credentials}", "Accept": "*/*"},
                keep_cookies=False,
            ).status

        statuses = [attempt(guesser, f"guess{i}", "x") for i in range(PER_ADDRESS[0])]
        self.assertEqual(statuses, [401] * PER_ADDRESS[0])
        self.assertEqual(attempt(guesser, "alice", "alice-pw"), 429)
        self.assertEqual(attempt(other, "alice", "alice-pw"), 200 if self.proxy_protocol else 429)


class BehindHAProxyWithProxyProtocol(BehindHAProxy):
    """The same, with the PROXY protocol between HAProxy and the proxies: the proxies see each
    client's own address, so the per-address sign-in limit is per client again."""

    proxy_protocol = True

    def test_sign_in_hop_removal_and_failover(self) -> None:
        # Only through the balancer: a PROXY protocol listener drops a connection that does
        # not start with a PROXY header (so a client reaching it directly cannot claim an
        # address). The rest is the same as without the PROXY protocol.
        direct = Browser(self.port, self.cafile)
        with self.assertRaises((OSError, http.client.HTTPException)):
            direct.request(MACHINES[0], "GET", self.main + "/_/health")
        signed_in = self.sign_in(BALANCER, BALANCER, "bob", "bob-pw")
        self.assertEqual((signed_in.status, signed_in.location), (303, "/"))
        for _ in range(4):
            answer = self.browser.request(BALANCER, "GET", self.main + self.project_path())
            self.assertEqual(answer.status, 200)
        # The hop, each step on a new connection (round robin: machine after machine, and a
        # worker of each); the ticket's replay, on the next one, is refused.
        start = self.browser.request(BALANCER, "GET", self.sub + "/")
        hop = self.browser.request(BALANCER, "GET", start.location)
        self.assertEqual(hop.status, 302, hop.body[:500])
        landed = self.browser.request(BALANCER, "GET", hop.location)
        self.assertEqual((landed.status, landed.location), (302, "/"), landed.body[:500])
        replays = [
            self.browser.request(BALANCER, "GET", hop.location, keep_cookies=False).status
            for _ in range(4)
        ]
        self.assertEqual(replays, [403] * 4)
        for _ in range(4):
            answer = self.browser.request(BALANCER, "GET", self.sub + "/")
            self.assertEqual(answer.status, 200)

    def test_ten_bad_guesses_spread_across_the_machines_count_together(self) -> None:
        # Names' limits count across machines as before, now through the balancer only.
        def attempt(password: str) -> Answer:
            credentials = base64.b64encode(f"alice:{password}".encode()).decode()
            return self.browser.request(
                BALANCER,
                "GET",
                self.main + self.project_path(),
                headers={"Authorization": f"Basic {credentials}", "Accept": "*/*"},
                keep_cookies=False,
            )

        for i in range(10):
            self.assertEqual(attempt(f"wrong-{i}").status, 401, i)
        self.assertEqual(attempt("alice-pw").status, 429)


class BehindHAProxyWithWorkers(BehindHAProxyWithProxyProtocol):
    """The same with two worker processes per proxy (--workers 2): the supervisor binds the
    PROXY protocol listener, each worker speaks the protocol on the socket it adopts."""

    workers = 2
