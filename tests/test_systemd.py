"""sd_notify and the watchdog, against a real datagram socket bound by the test."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

from twisted.internet import defer, task
from twisted.trial import unittest

from cocalcproxy.ops import systemd


class Receiver:
    """A real AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, case: unittest.TestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.sock.close)
        if abstract:
            name = "cocalcproxy-test-" + uuid.uuid4().hex
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            # Short absolute path: AF_UNIX names are limited to about 100 bytes.
            directory = tempfile.mkdtemp(prefix="cp-notify-")
            case.addCleanup(shutil.rmtree, directory, True)
            path = os.path.join(directory, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.sock.setblocking(False)

    def messages(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


class AddressTests(unittest.TestCase):
    def test_unset_or_empty_means_unsupervised(self) -> None:
        self.assertIsNone(systemd.notify_address({}))
        self.assertIsNone(systemd.notify_address({"NOTIFY_SOCKET": ""}))

    def test_path_and_abstract(self) -> None:
        self.assertEqual(systemd.notify_address({"NOTIFY_SOCKET": "/run/x"}), "/run/x")
        self.assertEqual(systemd.notify_address({"NOTIFY_SOCKET": "@abc"}), b"\0abc")

    def test_relative_name_refused(self) -> None:
        self.assertIsNone(systemd.notify_address({"NOTIFY_SOCKET": "run/x"}))

    def test_encode_refuses_multiline_values(self) -> None:
        self.assertEqual(systemd.encode(READY=1, STATUS="ok"), b"READY=1\nSTATUS=ok")
        self.assertRaises(ValueError, systemd.encode, STATUS="a\nREADY=1")


class WatchdogIntervalTests(unittest.TestCase):
    def test_half_of_watchdog_usec(self) -> None:
        self.assertEqual(systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7), 15.0)

    def test_absent_zero_or_garbage(self) -> None:
        self.assertIsNone(systemd.watchdog_interval({}, 7))
        self.assertIsNone(systemd.watchdog_interval({"WATCHDOG_USEC": "0"}, 7))
        self.assertIsNone(systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}, 7))

    def test_watchdog_pid_must_be_ours(self) -> None:
        env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}
        self.assertEqual(systemd.watchdog_interval(env, 7), 1.0)
        self.assertIsNone(systemd.watchdog_interval(env, 8))


class NotifierTests(unittest.TestCase):
    def test_datagram_to_path_socket(self) -> None:
        receiver = Receiver(self)
        notifier = systemd.Notifier({"NOTIFY_SOCKET": receiver.env_value})
        self.assertTrue(notifier.notify(READY=1))
        self.assertEqual(receiver.messages(), [b"READY=1"])

    def test_datagram_to_abstract_socket(self) -> None:
        receiver = Receiver(self, abstract=True)
        notifier = systemd.Notifier({"NOTIFY_SOCKET": receiver.env_value})
        self.assertTrue(notifier.notify(STOPPING=1))
        self.assertEqual(receiver.messages(), [b"STOPPING=1"])

    def test_missing_socket_is_logged_not_raised(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "nobody-listens")
        notifier = systemd.Notifier({"NOTIFY_SOCKET": path})
        self.assertFalse(notifier.notify(READY=1))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_unsupervised_sends_nothing(self) -> None:
        notifier = systemd.Notifier({})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.notify(READY=1))


class SystemdServiceTests(unittest.TestCase):
    def test_ready_only_after_listeners(self) -> None:
        receiver = Receiver(self)
        clock = task.Clock()
        listening: defer.Deferred[None] = defer.Deferred()
        svc = systemd.SystemdService(
            clock, lambda: listening, {"NOTIFY_SOCKET": receiver.env_value}, pid=1
        )
        svc.startService()
        self.assertEqual(receiver.messages(), [])
        listening.callback(None)
        self.assertEqual(receiver.messages(), [b"READY=1\nSTATUS=serving"])
        svc.stopService()
        self.assertEqual(receiver.messages(), [b"STOPPING=1\nSTATUS=draining requests in flight"])

    def test_no_ready_when_listening_fails(self) -> None:
        receiver = Receiver(self)
        listening: defer.Deferred[None] = defer.Deferred()
        svc = systemd.SystemdService(
            task.Clock(), lambda: listening, {"NOTIFY_SOCKET": receiver.env_value}
        )
        svc.startService()
        listening.errback(RuntimeError("port 443 taken"))
        self.assertEqual(receiver.messages(), [])
        self.assertFalse(svc.readied)
        svc.stopService()

    def test_stopping_sent_once(self) -> None:
        receiver = Receiver(self)
        svc = systemd.SystemdService(
            task.Clock(), lambda: None, {"NOTIFY_SOCKET": receiver.env_value}
        )
        svc.startService()
        receiver.messages()
        svc.notify_stopping()
        svc.stopService()
        self.assertEqual(len(receiver.messages()), 1)

    def test_watchdog_pings_every_half_interval(self) -> None:
        receiver = Receiver(self)
        clock = task.Clock()
        env = {"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "10000000"}
        svc = systemd.SystemdService(clock, defer.Deferred, env, pid=os.getpid())
        svc.startService()
        self.assertEqual(receiver.messages(), [b"WATCHDOG=1"])
        clock.advance(4.9)
        self.assertEqual(receiver.messages(), [])
        clock.advance(0.1)
        self.assertEqual(receiver.messages(), [b"WATCHDOG=1"])
        clock.advance(5)
        self.assertEqual(receiver.messages(), [b"WATCHDOG=1"])
        svc.stopService()
        receiver.messages()
        clock.advance(20)
        self.assertEqual(receiver.messages(), [])

    def test_watchdog_for_another_pid_is_silent(self) -> None:
        receiver = Receiver(self)
        clock = task.Clock()
        env = {
            "NOTIFY_SOCKET": receiver.env_value,
            "WATCHDOG_USEC": "10000000",
            "WATCHDOG_PID": "1",
        }
        svc = systemd.SystemdService(clock, defer.Deferred, env, pid=2)
        svc.startService()
        clock.advance(30)
        self.assertEqual(receiver.messages(), [])
        svc.stopService()
