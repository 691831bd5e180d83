"""Pure tests of the port-list parser, the backend policy and the socket rule (issue 16), and of
the screened TCP endpoint in memory (a host name that resolves to loopback)."""

from __future__ import annotations

import stat
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from cocalcproxy.directory import ports, validate
from cocalcproxy.directory.addresses import always_local
from cocalcproxy.directory.model import InvalidInput, Project
from cocalcproxy.directory.ports import PortListError, PortSet, parse_ports
from cocalcproxy.handlers import backends
from cocalcproxy.handlers.backendio import BackendRefused, Backends, is_local_address
from cocalcproxy.handlers.socketdir import Facts, judge
from cocalcproxy.http import routing

PID = "0b9d1c56-3f4a-4e6b-9a51-2c7d8e9f0a1b"


class PortListTests(unittest.TestCase):
    def test_normal_form(self) -> None:
        self.assertEqual(str(parse_ports("8888, 8000-8099")), "8000-8099,8888")
        self.assertEqual(str(parse_ports("5,4,3,7-9,6")), "3-9")
        self.assertEqual(str(parse_ports("10-20,15-30,31")), "10-31")
        self.assertEqual(str(parse_ports("80-80")), "80")
        self.assertEqual(parse_ports("none"), ports.NONE)
        self.assertEqual(parse_ports(" ALL "), ports.ALL)
        self.assertEqual(str(ports.NONE), "none")
        self.assertEqual(parse_ports("1-65535"), ports.ALL)

    def test_membership(self) -> None:
        s = parse_ports("8000-8099,8888")
        self.assertIn(8000, s)
        self.assertIn(8099, s)
        self.assertIn(8888, s)
        self.assertNotIn(7999, s)
        self.assertNotIn(8100, s)
        self.assertNotIn(8887, s)
        self.assertNotIn("8000", s)
        self.assertNotIn(0, ports.ALL)
        self.assertEqual(len(s), 101)
        self.assertFalse(ports.NONE)

    def test_refusals(self) -> None:
        for bad in (
            "",
            " ",
            "0",
            "65536",
            "08000",
            "+80",
            "-80",
            "80-",
            "90-80",
            "80,,81",
            "80;81",
            "8o",
            "1-99999",
            "80 81",
            "x" * 5000,
            ",".join(["1"] * 2000),
        ):
            with self.assertRaises(PortListError, msg=repr(bad)):
                parse_ports(bad)

    def test_hosts_in_disguise_refused(self) -> None:
        """Names the C resolver reads as IP addresses (inet_aton) would escape the loopback
        rules; the directory refuses them."""
        for bad in ("0x7f000001", "0x7f.1", "0x7f.0.0.1", "0X7F.0.0.1", "127.0x0.0.1"):
            with self.assertRaisesRegex(InvalidInput, "another notation", msg=bad):
                validate.host(bad)
        for fine in ("0xdeadbeef.example", "x0.example", "host-0x1"):
            self.assertEqual(validate.host(fine), fine)

    def test_validate_maps_to_invalid_input(self) -> None:
        self.assertIsNone(validate.ports(None))
        self.assertIsNone(validate.ports("default"))
        self.assertEqual(validate.ports("22,21"), parse_ports("21-22"))
        with self.assertRaisesRegex(InvalidInput, "invalid --ports"):
            validate.ports("abc")
        self.assertEqual(validate.socket_owner("1000"), 1000)
        self.assertEqual(validate.socket_dir("/run//x/"), "/run/x")
        for bad_dir in ("relative", "/", "/a\nb"):
            with self.assertRaises(InvalidInput):
                validate.socket_dir(bad_dir)
        for bad_uid in ("-1", "x", "01", str(2**32)):
            with self.assertRaises(InvalidInput):
                validate.socket_owner(bad_uid)

    @given(st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 300)), max_size=30))
    def test_parse_agrees_with_a_plain_set(self, items: list[tuple[int, int]]) -> None:
        text = ",".join(f"{lo}-{min(lo + n, 65535)}" if n else str(lo) for lo, n in items) or "none"
        parsed = parse_ports(text)
        plain = {p for lo, n in items for p in range(lo, min(lo + n, 65535) + 1)}
        self.assertEqual(len(parsed), len(plain))
        for probe in {*plain, *(p + 1 for p in plain), *(p - 1 for p in plain), 1, 65535}:
            self.assertEqual(probe in parsed, probe in plain)
        self.assertEqual(parse_ports(str(parsed)), parsed, "the normal form parses to itself")
        for (lo, hi), (next_lo, _) in zip(parsed.ranges, parsed.ranges[1:], strict=False):
            self.assertLess(hi + 1, next_lo, "sorted, disjoint, not adjacent")


def project(**kw: Any) -> Project:
    fields: dict[str, Any] = dict(
        id=PID, owner_id=1, owner_name="alice", host="127.0.0.1", home=None, title=""
    )
    fields.update(kw)
    return Project(**fields)


def route(port: int | None = 8000, kind: routing.Kind = "server") -> routing.Route:
    return routing.Route(PID, kind, port, b"", b"/")


def lan(ip: str) -> bool:
    """This test machine's addresses: loopback plus 10.0.0.5."""
    return always_local(ip) or ip == "10.0.0.5"


class PolicyTests(unittest.TestCase):
    def decide(self, p: Project, port: int = 8000, **policy: Any) -> Any:
        return backends.decide(route(port), p, backends.Policy(**policy), lan)

    def test_alone_gets_unprivileged_shared_gets_nothing(self) -> None:
        self.assertEqual(self.decide(project()), backends.TcpTarget("127.0.0.1", 8000))
        self.assertEqual(self.decide(project(), 1023).reason, "port-not-allowed")
        shared = self.decide(project(shares_host=True))
        self.assertEqual(shared.reason, "port-not-allowed")
        self.assertIn("--ports", shared.detail)
        self.assertIn("--socket-dir", shared.detail)
        # On this machine (127.0.0.1, localhost, its LAN address) a project is alone only when
        # the directory holds no other project: another's host may name this machine
        # differently (the LAN address beside 127.0.0.1, a name that resolves here).
        self.assertEqual(self.decide(project(other_projects=1)).reason, "port-not-allowed")
        lan_host = project(host="10.0.0.5", other_projects=1)
        self.assertEqual(self.decide(lan_host).reason, "port-not-allowed")
        only = self.decide(project(host="10.0.0.5"))
        self.assertEqual(only, backends.TcpTarget("10.0.0.5", 8000))
        remote = project(host="10.0.0.6", other_projects=3)
        self.assertEqual(self.decide(remote), backends.TcpTarget("10.0.0.6", 8000))
        self.assertEqual(self.decide(project(host="10.0.0.6", shares_host=True)).reason,
                         "port-not-allowed")  # fmt: skip
        # A host name is judged once it resolves: allowed for now, but only if it is remote.
        named = self.decide(project(host="p1.example", other_projects=2))
        self.assertEqual(named, backends.TcpTarget("p1.example", 8000, remote_only=True))
        alone = self.decide(project(host="p1.example"))
        self.assertEqual(alone, backends.TcpTarget("p1.example", 8000, remote_only=False))
        mine = project(host="p1.example", other_projects=2, ports=parse_ports("8000"))
        own_set = self.decide(mine)
        self.assertEqual(own_set, backends.TcpTarget("p1.example", 8000, remote_only=False))

    def test_own_set_and_operator_default(self) -> None:
        mine = project(ports=parse_ports("8888"), shares_host=True)
        self.assertEqual(self.decide(mine, 8888), backends.TcpTarget("127.0.0.1", 8888))
        self.assertEqual(self.decide(mine, 8000).reason, "port-not-allowed")
        narrow = parse_ports("9000-9009")
        self.assertEqual(self.decide(project(), 9005, default_ports=narrow).port, 9005)
        self.assertEqual(self.decide(project(), 8000, default_ports=narrow).reason,
                         "port-not-allowed")  # fmt: skip
        self.assertEqual(self.decide(project(ports=ports.NONE), 8000).reason, "port-not-allowed")

    def test_deny_list_on_top_of_any_set(self) -> None:
        everything = project(ports=ports.ALL, host="10.9.9.9")
        for port in (22, 5432, 6379, 11211, 2375, 10250, 2379):
            self.assertEqual(self.decide(everything, port).reason, "port-denied", port)
        self.assertEqual(self.decide(everything, 5432, deny_ports=ports.NONE).port, 5432)

    def test_own_listeners_on_local_hosts_only(self) -> None:
        own = backends.OwnListeners()
        remove = own.add("metrics listener", port=9100)
        own.add("directory database", port=6000, address="10.0.0.7")
        anything = dict(own=own, deny_ports=ports.NONE)
        for host in ("127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "::", "localhost",
                     "a.localhost", "10.0.0.5", "::ffff:127.0.0.1"):  # fmt: skip
            refused = self.decide(project(host=host, ports=ports.ALL), 9100, **anything)
            self.assertEqual(refused.reason, "own-listener", host)
            self.assertIn("metrics listener", refused.detail)
        self.assertEqual(self.decide(project(host="10.0.0.6", ports=ports.ALL), 9100, **anything),
                         backends.TcpTarget("10.0.0.6", 9100))  # fmt: skip
        # Names are judged after resolution (screen), by address.
        policy = backends.Policy(**anything)
        for ip in ("127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1", "0.0.0.0", "10.0.0.5"):
            self.assertEqual(backends.screen(ip, 9100, policy, lan).reason, "own-listener", ip)
        self.assertIsNone(backends.screen("10.0.0.6", 9100, policy, lan))
        self.assertEqual(backends.screen("10.0.0.7", 6000, policy, lan).reason, "own-listener")
        self.assertIsNone(backends.screen("10.0.0.8", 6000, policy, lan))
        self.assertEqual(backends.screen("10.0.0.8", 22, backends.Policy(), lan).reason,
                         "port-denied")  # fmt: skip
        remove()
        self.assertIsNone(backends.screen("127.0.0.1", 9100, policy, lan))

    def test_socket_projects(self) -> None:
        sockets = project(socket_dir="/run/p", shares_host=True, socket_owner=1000)
        self.assertEqual(self.decide(sockets, 22), backends.UnixTarget("/run/p", 22, 1000))
        self.assertEqual(backends.UnixTarget("/run/p", 22, None).path, "/run/p/22")
        limited = project(socket_dir="/run/p", ports=parse_ports("8000"))
        self.assertEqual(self.decide(limited, 8001).reason, "port-not-allowed")

    def test_raw_and_portless_routes_never_get_a_backend(self) -> None:
        p = project(ports=ports.ALL)
        policy = backends.Policy()
        self.assertIsInstance(backends.decide(route(None, "raw"), p, policy, lan), backends.Refused)

    def test_is_local_address_binds(self) -> None:
        self.assertTrue(is_local_address("127.0.0.1"))
        self.assertTrue(is_local_address("0.0.0.0"))
        self.assertFalse(is_local_address("192.0.2.1"), "TEST-NET-1 is nobody's")
        self.assertFalse(is_local_address("not an ip"))


def facts(mode: int, uid: int = 1000, gid: int = 1000, ino: int = 1) -> Facts:
    return Facts(mode, uid, gid, 1, ino)


DIR = stat.S_IFDIR
SOCK = stat.S_IFSOCK
ROOT_DIR = facts(DIR | 0o755, 0, 0)


class SocketRuleTests(unittest.TestCase):
    def judge(self, folder: Facts, sock: Facts | None, owner: int | None = None,
              ancestors: list[tuple[str, Facts]] | None = None, proxy_gid: int = 50,
              own: frozenset[tuple[int, int]] = frozenset()) -> str | None:  # fmt: skip
        return judge(
            ancestors if ancestors is not None else [("/", ROOT_DIR), ("/run", ROOT_DIR)],
            "/run/alice",
            folder,
            "8888",
            sock,
            owner,
            proxy_gid,
            own,
        )

    def test_good_set_ups(self) -> None:
        self.assertIsNone(self.judge(facts(DIR | 0o700), facts(SOCK | 0o600)))
        self.assertIsNone(self.judge(facts(DIR | 0o700), facts(SOCK | 0o777)), "uvicorn: 0666")
        # Group of the proxy may pass the folder and write the socket.
        self.assertIsNone(self.judge(facts(DIR | 0o2750, gid=50), facts(SOCK | 0o660, gid=50)))
        self.assertIsNone(self.judge(facts(DIR | 0o700), None), "missing: caller answers")
        sticky = [("/", ROOT_DIR), ("/tmp", facts(DIR | stat.S_ISVTX | 0o777, 0, 0))]
        self.assertIsNone(self.judge(facts(DIR | 0o700), facts(SOCK | 0o600), ancestors=sticky))
        self.assertIsNone(self.judge(facts(DIR | 0o700, uid=0), facts(SOCK | 0o600), owner=1000))

    def test_writable_folders(self) -> None:
        for mode in (0o770, 0o720, 0o707, 0o702, 0o1777, 0o2770):
            why = self.judge(facts(DIR | mode), facts(SOCK | 0o600))
            self.assertIsNotNone(why, oct(mode))
            self.assertIn("writable by group or others", why or "")

    def test_not_a_socket(self) -> None:
        for kind, word in ((stat.S_IFREG, "regular file"), (stat.S_IFLNK, "symbolic link"),
                           (stat.S_IFDIR, "folder"), (stat.S_IFIFO, "named pipe")):  # fmt: skip
            why = self.judge(facts(DIR | 0o700), facts(kind | 0o600))
            self.assertIn(word, why or "")

    def test_owners(self) -> None:
        why = self.judge(facts(DIR | 0o700), facts(SOCK | 0o600, uid=1001))
        self.assertIn("belongs to uid 1001, not to the owner (uid 1000)", why or "")
        why = self.judge(facts(DIR | 0o700, uid=1001), facts(SOCK | 0o600, uid=1001), owner=1000)
        self.assertIn("belongs to uid 1001, not uid 1000", why or "")
        self.assertIsNone(
            self.judge(facts(DIR | 0o700, uid=0), facts(SOCK | 0o600, uid=0)), "root's own"
        )

    def test_folders_on_the_way(self) -> None:
        theirs = [("/", ROOT_DIR), ("/home/bob", facts(DIR | 0o755, uid=1001))]
        why = self.judge(facts(DIR | 0o700), facts(SOCK | 0o600), ancestors=theirs)
        self.assertIn("belongs to uid 1001", why or "")
        loose = [("/", ROOT_DIR), ("/srv", facts(DIR | 0o777, 0, 0))]
        why = self.judge(facts(DIR | 0o700), facts(SOCK | 0o600), ancestors=loose)
        self.assertIn("on the way is writable", why or "")

    def test_others_who_could_connect(self) -> None:
        why = self.judge(facts(DIR | 0o711), facts(SOCK | 0o666))
        self.assertIn("any local user can connect", why or "")
        why = self.judge(facts(DIR | 0o750, gid=77), facts(SOCK | 0o660, gid=77))
        self.assertIn("members of group 77", why or "")
        self.assertIsNone(self.judge(facts(DIR | 0o750, gid=77), facts(SOCK | 0o600, gid=77)))

    def test_own_listener_socket(self) -> None:
        why = self.judge(facts(DIR | 0o700), facts(SOCK | 0o600, ino=42), own=frozenset({(1, 42)}))
        self.assertIn("proxy's own", why or "")


class FakeResolver:
    """Resolves every name to the addresses given."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    def resolveHostName(self, receiver: Any, name: str, portNumber: int = 0, *a: Any) -> Any:  # noqa: N802, N803
        receiver.resolutionBegan(None)
        for ip in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", ip, portNumber))
        receiver.resolutionComplete()
        return None


class ScreenedEndpointTests(unittest.TestCase):
    """A host name is judged by what it resolves to, and the connection goes to exactly the
    addresses judged (no second lookup)."""

    def backends_with(self, *addresses: str) -> tuple[MemoryReactorClock, Backends]:
        reactor = MemoryReactorClock()
        reactor.nameResolver = FakeResolver(*addresses)  # type: ignore[attr-defined]
        own = backends.OwnListeners()
        own.add("metrics listener", port=9100)
        return reactor, Backends(reactor, backends.Policy(own=own), is_local=lan)

    def test_name_resolving_to_loopback_refused_for_own_port(self) -> None:
        reactor, b = self.backends_with("127.0.0.1")
        d = b.endpoint(backends.TcpTarget("evil.example", 9100)).connect(
            Factory.forProtocol(Protocol)
        )
        failure = self.failureResultOf(d, BackendRefused)
        self.assertEqual(failure.value.refusal.reason, "own-listener")
        self.assertEqual(reactor.tcpClients, [], "never connected")

    def test_mixed_answers_refused_whole(self) -> None:
        reactor, b = self.backends_with("10.0.0.6", "10.0.0.5")
        d = b.endpoint(backends.TcpTarget("evil.example", 9100)).connect(
            Factory.forProtocol(Protocol)
        )
        self.failureResultOf(d, BackendRefused)
        self.assertEqual(reactor.tcpClients, [])

    def test_remote_name_connects_to_the_resolved_address(self) -> None:
        reactor, b = self.backends_with("10.0.0.6")
        b.endpoint(backends.TcpTarget("fine.example", 9100)).connect(Factory.forProtocol(Protocol))
        self.assertEqual([c[:2] for c in reactor.tcpClients], [("10.0.0.6", 9100)])

    def test_ip_literal_screened_before_connecting(self) -> None:
        reactor, b = self.backends_with()
        d = b.endpoint(backends.TcpTarget("10.0.0.5", 9100)).connect(Factory.forProtocol(Protocol))
        self.failureResultOf(d, BackendRefused)
        d = b.endpoint(backends.TcpTarget("10.0.0.5", 2375)).connect(Factory.forProtocol(Protocol))
        self.assertEqual(
            self.failureResultOf(d, BackendRefused).value.refusal.reason, "port-denied"
        )


class PortSetTypeTests(unittest.TestCase):
    def test_intersection(self) -> None:
        a, b = parse_ports("1-10,20-30"), parse_ports("5-25")
        self.assertEqual(a.intersection(b), PortSet(((5, 10), (20, 25))))


class DatabaseRegistrationTests(unittest.TestCase):
    """The directory's database joins the own-endpoint registry (service.register_database)."""

    def registered(self, url: str) -> list[tuple[str, int | None, str | None, str | None]]:
        from cocalcproxy.ops.service import register_database

        own = backends.OwnListeners()
        register_database(own, url)
        return own.entries()

    def test_forms(self) -> None:
        self.assertEqual(self.registered("sqlite:////tmp/x.sqlite3"), [])
        self.assertEqual(
            self.registered("postgresql://u@127.0.0.1:5433/db"),
            [("directory database", 5433, None, None)],
        )
        self.assertEqual(
            self.registered("postgresql://u@localhost/db"),
            [("directory database", 5432, None, None)],
        )
        self.assertEqual(
            self.registered("postgres://u@192.0.2.7:6000/db"),
            [("directory database", 6000, "192.0.2.7", None)],
        )
        self.assertEqual(
            self.registered("postgresql:///db"),
            [("directory database", None, None, "/var/run/postgresql/.s.PGSQL.5432")],
        )
        self.assertEqual(self.registered("postgresql://u@no-such-host.invalid/db"), [])


def as_user(uid: int, gid: int, work: Any) -> str:
    """Run ``work()`` in a forked child under uid/gid; its return value or exception as text."""
    import os

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only reports through the pipe
        message = "nothing"
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            message = str(work())
        except BaseException as e:
            message = f"{type(e).__name__}: {getattr(e, 'why', e)}"
        finally:
            os.write(write, message.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    return message


PROXY_UID = PROXY_GID = 54321
OWNER_UID = 54322


class SocketFolderAsAnotherUserTests(unittest.TestCase):
    """The checks as an unprivileged proxy meets them (a forked child under unused ids)."""

    def folder(self, mode: int, uid: int = 0, gid: int = 0) -> str:
        import os
        import shutil
        import tempfile

        parent = tempfile.mkdtemp(prefix="cp-user-", dir="/tmp")
        self.addCleanup(shutil.rmtree, parent, True)
        os.chmod(parent, 0o755)
        folder = os.path.join(parent, "alice")
        os.mkdir(folder)
        os.chown(folder, uid, gid)
        os.chmod(folder, mode)
        return folder

    def test_folder_the_proxy_may_not_enter(self) -> None:
        from cocalcproxy.handlers.socketdir import open_checked

        folder = self.folder(0o700)
        target = backends.UnixTarget(folder + "/x", 8000, None)
        message = as_user(PROXY_UID, PROXY_GID, lambda: open_checked(target))
        self.assertIn(f"the proxy may not reach {folder}/x: give it search", message)

    def test_the_documented_set_up_lets_the_proxy_in(self) -> None:
        """Folder of the owner with the proxy's group, mode 2750; socket 0660: the proxy (not
        root) passes the checks and connects through the opened folder."""
        import os
        import socket

        from cocalcproxy.handlers.socketdir import open_checked

        folder = self.folder(0o2750, OWNER_UID, PROXY_GID)
        path = os.path.join(folder, "8000")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)
        os.chown(path, OWNER_UID, PROXY_GID)
        os.chmod(path, 0o660)

        def connect() -> str:
            fd, name = open_checked(backends.UnixTarget(folder, 8000, None))
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(f"/proc/self/fd/{fd}/{name}")
            return "connected"

        self.assertEqual(as_user(PROXY_UID, PROXY_GID, connect), "connected")
        # Another group's members could pass and write too: refused.
        os.chown(path, OWNER_UID, 777)
        os.chown(folder, OWNER_UID, 777)
        os.chmod(folder, 0o751)
        message = as_user(PROXY_UID, PROXY_GID, connect)
        self.assertIn("members of group 777 can connect", message)
        # A folder the proxy may not look into: refused, saying so.
        os.chmod(folder, 0o750)
        message = as_user(PROXY_UID, PROXY_GID, connect)
        self.assertIn(f"the proxy may not look into {folder}: give it search", message)


HOSTS = ("127.0.0.1", "127.9.9.9", "::1", "localhost", "0.0.0.0", "10.0.0.5", "10.0.0.6",
         "db.example", "::ffff:127.0.0.1")  # fmt: skip
SMALL_SETS = st.one_of(
    st.none(),
    st.sampled_from([ports.NONE, ports.ALL, parse_ports("8000-8010"), parse_ports("22,9100")]),
)


class PolicyPropertyTests(unittest.TestCase):
    """Whatever the project and the policy: what decide() lets through obeys every rule."""

    @given(
        host=st.sampled_from(HOSTS),
        own_ports=SMALL_SETS,
        default=SMALL_SETS,
        deny=st.sampled_from([ports.NONE, backends.DEFAULT_DENY, parse_ports("8005")]),
        shares=st.booleans(),
        neighbours=st.integers(min_value=0, max_value=2),
        sockets=st.booleans(),
        port=st.sampled_from([22, 80, 1023, 1024, 5432, 8000, 8005, 8010, 9100, 65535]),
    )
    def test_invariants(
        self, host: str, own_ports: PortSet | None, default: PortSet | None, deny: PortSet,
        shares: bool, neighbours: int, sockets: bool, port: int,
    ) -> None:  # fmt: skip
        own = backends.OwnListeners()
        own.add("metrics listener", port=9100)
        policy = backends.Policy(default_ports=default, deny_ports=deny, own=own)
        p = project(host=host, ports=own_ports, shares_host=shares,
                    other_projects=neighbours,
                    socket_dir="/run/p" if sockets else None)  # fmt: skip
        allowed, _ = backends.ports_for(p, policy, lan)
        decision = backends.decide(route(port), p, policy, lan)
        if own_ports is not None:
            self.assertEqual(allowed, own_ports, "the project's own set wins")
        elif default is not None:
            self.assertEqual(allowed, default, "then the operator's")
        if isinstance(decision, backends.Refused):
            self.assertIn(decision.reason, ("port-not-allowed", "port-denied", "own-listener"))
            return
        self.assertIn(port, allowed)
        if sockets:
            self.assertEqual(decision, backends.UnixTarget("/run/p", port, None))
            return
        self.assertEqual((decision.host, decision.port), (host, port))
        self.assertNotIn(port, deny)
        on_this_machine = lan(host) or host in ("localhost", "::ffff:127.0.0.1")
        self.assertFalse(port == 9100 and on_this_machine, "never the metrics listener")
        if own_ports is None and default is None:
            shared = shares or (neighbours and on_this_machine)
            self.assertFalse(shared, "auto allows nothing on a shared host")
            self.assertGreaterEqual(port, 1024)


class CachedAddressParsing(unittest.TestCase):
    """ip_of and always_local are cached (they run for every proxied request): the cached
    answers are the parser's, invalid input included, and a repeat costs no parse."""

    SAMPLES = [
        "127.0.0.1",
        "10.0.0.5",
        "[::1]",
        "::ffff:127.0.0.1",
        "fe80::1%eth0",
        "0.1.2.3",
        "localhost",
        "example.org",
        "300.1.1.1",
        "",
    ]

    def test_same_answers_as_parsing(self) -> None:
        import ipaddress

        from cocalcproxy.directory import addresses

        for host in self.SAMPLES:
            text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            try:
                expected: object = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                expected = None
            for _ in range(2):
                self.assertEqual(addresses.ip_of(host), expected, host)
        self.assertEqual(
            [always_local(h) for h in self.SAMPLES],
            [True, False, True, True, False, True, True, False, False, False],
        )

    def test_a_repeat_is_not_parsed_again(self) -> None:
        from cocalcproxy.directory import addresses

        addresses.ip_of("192.0.2.7")
        hits = addresses.ip_of.cache_info().hits
        addresses.ip_of("192.0.2.7")
        self.assertEqual(addresses.ip_of.cache_info().hits, hits + 1)
