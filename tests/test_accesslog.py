"""The JSON access log: its line format, and real requests through a real proxy on loopback TLS."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet import defer
from twisted.logger import formatEventAsClassicLogText, globalLogPublisher
from twisted.trial import unittest

from cocalcproxy import directory as directory_module
from cocalcproxy.ops import accesslog
from tests.fullfs import SmallDisk
from tests.support import https_client, start_proxy


class QuietSync:
    """The blocking face of :class:`QuietDirectory`: the form key is made afresh."""

    def shared_secret(self, name: str, make: Any) -> str:
        return str(make())


class QuietDirectory:
    """Just enough directory for the proxy's own pages (health); every lookup finds nobody."""

    sync = QuietSync()

    def ping(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def change_counter(self) -> defer.Deferred[int]:
        return defer.succeed(0)

    def change_listener(self, on_change: Any) -> None:
        return None  # like SQLite: no change notifications, the guard polls

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: defer.succeed(None)


def use_quiet_directory(case: unittest.TestCase) -> None:
    case.patch(directory_module, "open_directory", lambda url, reactor: QuietDirectory())


def sample(**changes: Any) -> accesslog.RequestFacts:
    fields: dict[str, Any] = dict(
        time=1_700_000_000.25,
        client="192.0.2.7",
        method="GET",
        host="proxy.example",
        path="/8c0e3a35-7a4b-4d5f-9c1e-2f3a4b5c6d7e/server/8000/",
        has_query=True,
        status=200,
        completed=True,
        bytes_in=0,
        bytes_out=1234,
        duration=0.0125,
        account="alice",
        project="8c0e3a35-7a4b-4d5f-9c1e-2f3a4b5c6d7e",
        form="server",
        port=8000,
    )
    fields.update(changes)
    return accesslog.RequestFacts(**fields)


class FormatTests(unittest.TestCase):
    def test_one_json_object_per_line(self) -> None:
        line = accesslog.format_line(sample())
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["time"], "2023-11-14T22:13:20.250Z")
        self.assertEqual(record["client"], "192.0.2.7")
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["bytes_out"], 1234)
        self.assertEqual(record["duration_ms"], 12.5)
        self.assertEqual(record["account"], "alice")
        self.assertEqual(record["form"], "server")
        self.assertEqual(record["port"], 8000)
        self.assertIs(record["query"], True)

    def test_hostile_text_cannot_forge_a_line(self) -> None:
        line = accesslog.format_line(
            sample(path='/x\n{"status":200}\u2028', method="G\rET", host="a\x00b")
        )
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(line.isascii())
        self.assertEqual(json.loads(line)["path"], '/x\n{"status":200}\u2028')

    def test_backend_and_websocket_words_only_when_present(self) -> None:
        plain = json.loads(accesslog.format_line(sample()))
        self.assertNotIn("backend", plain)
        self.assertNotIn("websocket_end", plain)
        record = json.loads(
            accesslog.format_line(sample(backend_error="refused", websocket_end="idle timeout"))
        )
        self.assertEqual(record["backend"], "refused")
        self.assertEqual(record["websocket_end"], "idle timeout")

    def test_stream_gets_flushed_lines(self) -> None:
        stream = io.StringIO()
        log = accesslog.AccessLog(stream=stream)
        log.write(sample())
        log.write(sample(status=404))
        lines = stream.getvalue().splitlines()
        self.assertEqual([json.loads(x)["status"] for x in lines], [200, 404])

    def test_file_is_reopened(self) -> None:
        path = os.path.abspath(self.mktemp())
        log = accesslog.AccessLog(path)
        self.addCleanup(log.close)
        log.write(sample())
        os.rename(path, path + ".1")
        log.reopen()
        log.write(sample(status=500))
        with open(path + ".1") as f:
            self.assertEqual(json.loads(f.read())["status"], 200)
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["status"], 500)


class EndToEndTests(unittest.TestCase):
    """Real TLS requests to a real proxy in this process; the log goes to a file we read."""

    def setUp(self) -> None:
        use_quiet_directory(self)
        self.log_path = os.path.abspath(self.mktemp())

    def records(self) -> list[dict[str, Any]]:
        with open(self.log_path) as f:
            return [json.loads(line) for line in f]

    @defer.inlineCallbacks
    def test_each_request_one_line_without_secrets(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self, "--access-log", self.log_path)
        client = https_client(self, proxy.cert_path)
        secret = "s3cr3t-token-value-0123456789"
        events: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            events.append(formatEventAsClassicLogText(event) or "")

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        response = yield client.get(
            proxy.url + "/_/health?token=" + secret,
            headers={
                "Cookie": "cocalcproxy_session=" + secret,
                "Authorization": "Bearer " + secret,
                "Referer": "https://x.example/?token=" + secret,
            },
        )
        yield response.content()
        self.assertEqual(response.code, 200)
        missing = yield client.get(proxy.url + "/no/such/thing?token=" + secret)
        yield missing.content()
        self.assertEqual(missing.code, 404)

        with open(self.log_path) as f:
            text = f.read()
        self.assertNotIn(secret, text)
        # Nor in anything else the process logged (Twisted's own combined log would have it).
        self.assertNotIn(secret, "".join(events))
        self.assertNotIn("token", text)
        records = self.records()
        self.assertEqual(len(records), 2)
        health, not_found = records
        self.assertEqual(health["path"], "/_/health")
        self.assertEqual(health["status"], 200)
        self.assertEqual(health["form"], "own")
        self.assertEqual(health["method"], "GET")
        self.assertEqual(health["client"], "127.0.0.1")
        self.assertIs(health["query"], True)
        self.assertIs(health["completed"], True)
        self.assertGreater(health["bytes_out"], 0)
        self.assertGreaterEqual(health["duration_ms"], 0)
        self.assertEqual(not_found["status"], 404)
        self.assertEqual(not_found["path"], "/no/such/thing")

    @defer.inlineCallbacks
    def test_request_body_counted(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self, "--access-log", self.log_path)
        client = https_client(self, proxy.cert_path)
        response = yield client.post(proxy.url + "/_/login", data=b"x" * 5000)
        yield response.content()
        self.assertEqual(response.code, 415)
        (record,) = self.records()
        self.assertEqual(record["bytes_in"], 5000)
        self.assertEqual(record["method"], "POST")

    @defer.inlineCallbacks
    def test_off_writes_nothing(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self, "--access-log", "off")
        self.assertIsNone(proxy.service.access_log)
        client = https_client(self, proxy.cert_path)
        response = yield client.get(proxy.url + "/_/health")
        yield response.content()
        self.assertFalse(os.path.exists(self.log_path))


class FullDiskTests(unittest.TestCase):
    """The writer on a real filesystem that runs full (a 64 KiB tmpfs)."""

    def setUp(self) -> None:
        self.disk = SmallDisk(self)
        self.path = str(self.disk.path / "access.log")
        self.lost: list[int] = []
        self.events: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "cocalcproxy.accesslog":
                self.events.append(formatEventAsClassicLogText(event) or "")

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def lines_of(self, path: str) -> list[str]:
        with open(path) as f:
            return f.read().splitlines()

    def write_until_lost(self, log: accesslog.AccessLog) -> None:
        """Write until a line is lost: the file's last page may still take a few lines."""
        for _ in range(1000):
            log.write(sample())
            if self.lost:
                return
        raise AssertionError("the full disk never refused a line")

    def test_lost_lines_counted_and_logged_once_each_way(self) -> None:
        log = accesslog.AccessLog(self.path, on_lost=self.lost.append)
        self.addCleanup(log.close)
        log.write(sample(status=201))
        self.disk.fill()
        self.write_until_lost(log)
        before = sum(self.lost)
        for _ in range(10):
            log.write(sample(status=507))
        self.assertEqual(sum(self.lost) - before, 10)
        self.assertTrue(log.failing)
        self.assertEqual(len(self.events), 1, self.events)
        self.assertIn("cannot write (No space left on device)", self.events[0])

        self.disk.free()
        log.write(sample(status=202))
        log.write(sample(status=203))
        self.assertFalse(log.failing)
        self.assertEqual(len(self.events), 2, self.events)
        self.assertIn(f"writing again ({sum(self.lost)} line(s) were lost)", self.events[1])
        lines = self.lines_of(self.path)
        self.assertEqual(json.loads(lines[0])["status"], 201)
        # A line cut short by the full disk stays a fragment on its own; the lines after the
        # recovery are whole lines of their own.
        self.assertEqual([json.loads(x)["status"] for x in lines[-2:]], [202, 203])
        broken = []
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                broken.append(line)
        self.assertLessEqual(len(broken), 1, broken)

    def test_sighup_opens_a_new_file_even_after_a_full_disk(self) -> None:
        log = accesslog.AccessLog(self.path, on_lost=self.lost.append)
        self.addCleanup(log.close)
        self.disk.fill()
        self.write_until_lost(log)
        os.rename(self.path, self.path + ".1")
        log.reopen()  # closing the old file must not keep the new one from opening
        self.assertTrue(os.path.exists(self.path))
        self.disk.free()
        log.write(sample(status=299))
        self.assertEqual([json.loads(x)["status"] for x in self.lines_of(self.path)], [299])

    def test_reopen_failure_keeps_the_old_file(self) -> None:
        log = accesslog.AccessLog(self.path, on_lost=self.lost.append)
        self.addCleanup(log.close)
        os.rename(self.path, self.path + ".1")
        os.mkdir(self.path)  # the configured path cannot be opened as a file now
        log.reopen()
        self.assertIn("cannot open it afresh", self.events[-1])
        self.assertIn("still writing to the previous file", self.events[-1])
        log.write(sample(status=298))
        self.assertEqual(self.lost, [])
        self.assertEqual([json.loads(x)["status"] for x in self.lines_of(self.path + ".1")], [298])
