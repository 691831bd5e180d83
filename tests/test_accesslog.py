"""The JSON access log: its line format, and real requests through a real proxy on loopback TLS."""

from __future__ import annotations

import errno
import io
import json
import os
import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
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

    def records(self, proxy: Any) -> list[dict[str, Any]]:
        proxy.service.access_log.flush()  # not waiting up to 100 ms for the lines
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

        records = self.records(proxy)
        with open(self.log_path) as f:
            text = f.read()
        self.assertNotIn(secret, text)
        # Nor in anything else the process logged (Twisted's own combined log would have it).
        self.assertNotIn(secret, "".join(events))
        self.assertNotIn("token", text)
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
        (record,) = self.records(proxy)
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

    def test_batches_on_a_full_disk_lose_only_what_is_not_in_the_file(self) -> None:
        clock = Clock()
        log = accesslog.AccessLog(self.path, on_lost=self.lost.append, clock=clock)
        self.addCleanup(log.close)
        self.disk.fill()
        written = 0
        while not self.lost:
            for _ in range(50):
                log.write(sample(status=507))
            written += 50
            clock.advance(0.1)
            self.assertLess(written, 20_000, "the full disk never refused a batch")
        self.assertEqual(len(self.events), 1, self.events)
        whole = 0
        for line in self.lines_of(self.path):
            try:
                json.loads(line)
                whole += 1
            except ValueError:
                pass
        self.assertEqual(whole + sum(self.lost), written)
        self.disk.free()
        log.write(sample(status=202))
        clock.advance(0.1)
        self.assertFalse(log.failing)
        self.assertIn(f"writing again ({sum(self.lost)} line(s) were lost)", self.events[-1])
        self.assertEqual(json.loads(self.lines_of(self.path)[-1])["status"], 202)

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


class BufferTests(unittest.TestCase):
    """Lines wait in memory, written in one batch within 100 ms or once 64 KiB wait (issue 10)."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.clock = Clock()
        self.lost: list[int] = []
        self.writes: list[int] = []
        real_write = os.write

        def counting_write(fd: int, data: Any) -> int:
            self.writes.append(len(data))
            return real_write(fd, data)

        self.patch(accesslog.os, "write", counting_write)

    def open_log(self, path: str | None = None) -> accesslog.AccessLog:
        log = accesslog.AccessLog(path or self.path, on_lost=self.lost.append, clock=self.clock)
        self.addCleanup(log.close)
        return log

    def statuses(self, path: str | None = None) -> list[int]:
        with open(path or self.path) as f:
            return [json.loads(line)["status"] for line in f]

    def test_lines_wait_until_100_ms_after_the_first(self) -> None:
        log = self.open_log()
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer while nothing waits")
        log.write(sample(status=200))
        self.clock.advance(0.05)
        log.write(sample(status=201))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "one timer for the batch")
        self.clock.advance(0.0499)
        self.assertEqual(self.statuses(), [])
        self.clock.advance(0.0001)
        self.assertEqual(self.statuses(), [200, 201])
        self.assertEqual(len(self.writes), 1, "one write for the batch")
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer once idle again")
        # The next line starts a new 100 ms from its own arrival.
        self.clock.advance(5)
        log.write(sample(status=202))
        self.clock.advance(0.099)
        self.assertEqual(self.statuses(), [200, 201])
        self.clock.advance(0.001)
        self.assertEqual(self.statuses(), [200, 201, 202])

    def test_a_full_buffer_is_written_at_once(self) -> None:
        log = self.open_log()
        line = len(accesslog.format_line(sample()))
        count = -(-accesslog.FLUSH_BYTES // line)  # the first count that reaches 64 KiB
        for _ in range(count - 1):
            log.write(sample())
        self.assertEqual(self.writes, [])
        log.write(sample())
        self.assertEqual(self.writes, [count * line])
        self.assertEqual(len(self.statuses()), count)
        self.assertEqual(self.clock.getDelayedCalls(), [], "the timer went with the batch")

    def test_close_writes_the_waiting_lines(self) -> None:
        log = self.open_log()
        log.write(sample(status=200))
        log.write(sample(status=201))
        log.close()
        self.assertEqual(self.statuses(), [200, 201])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        log.write(sample(status=202))  # after close: counted as lost, never half-written
        self.assertEqual(self.lost, [1])
        self.assertEqual(self.statuses(), [200, 201])

    def test_end_buffering_writes_waiting_and_later_lines_at_once(self) -> None:
        log = self.open_log()
        log.write(sample(status=200))
        log.end_buffering()
        self.assertEqual(self.statuses(), [200])
        log.write(sample(status=201))
        self.assertEqual(self.statuses(), [200, 201])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reopen_writes_the_waiting_lines_to_the_old_file_first(self) -> None:
        log = self.open_log()
        log.write(sample(status=200))
        log.write(sample(status=201))
        os.rename(self.path, self.path + ".1")
        log.reopen()
        log.write(sample(status=202))
        self.clock.advance(0.1)
        self.assertEqual(self.statuses(self.path + ".1"), [200, 201])
        self.assertEqual(self.statuses(), [202])

    def test_a_batch_cut_short_counts_only_the_lines_not_written_whole(self) -> None:
        log = self.open_log()
        line = len(accesslog.format_line(sample()))
        real_write = os.write
        calls: list[int] = []

        def disk_fills(fd: int, data: Any) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[: line + 10]))  # one line and a bit
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(accesslog.os, "write", disk_fills)
        for status in (200, 201, 202, 203):
            log.write(sample(status=status))
        self.clock.advance(0.1)
        self.assertEqual(self.lost, [3], "the cut line and the two after it")
        self.assertTrue(log.failing)
        self.patch(accesslog.os, "write", real_write)
        log.write(sample(status=204))
        log.write(sample(status=205))
        self.clock.advance(0.1)
        self.assertFalse(log.failing)
        self.assertEqual(self.lost, [3])
        with open(self.path) as f:
            lines = f.read().splitlines()
        # The fragment stays on a line of its own; the lines after recovery are whole.
        self.assertEqual(json.loads(lines[0])["status"], 200)
        self.assertEqual(len(lines[1]), 10)
        self.assertEqual([json.loads(x)["status"] for x in lines[2:]], [204, 205])

    def test_a_batch_that_fails_outright_counts_every_line(self) -> None:
        log = self.open_log()

        def full(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(accesslog.os, "write", full)
        for _ in range(7):
            log.write(sample())
        self.assertEqual(self.lost, [])
        self.clock.advance(0.1)
        self.assertEqual(self.lost, [7])


class PipeTests(unittest.TestCase):
    """A worker's lines on its pipe to the supervisor: batches larger than PIPE_BUF and than
    the pipe itself arrive complete and in order, even on a pipe set non-blocking."""

    def test_batches_through_a_pipe_stay_whole(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        os.set_blocking(write_end, False)
        clock = Clock()
        lost: list[int] = []
        log = accesslog.AccessLog("-", pipe_fd=write_end, on_lost=lost.append, clock=clock)
        self.addCleanup(log.close)  # closes the write end: the reader ends even if this fails
        self.assertTrue(os.get_blocking(write_end))
        received: list[bytes] = []

        def drain() -> None:
            while chunk := os.read(read_end, 4096):
                received.append(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        long_path = "/" + "x" * 6000  # each line longer than PIPE_BUF
        for n in range(100):  # some 600 KiB: several 64 KiB batches, each more than a pipe holds
            log.write(sample(path=long_path, bytes_out=n))
        clock.advance(0.1)
        log.close()
        reader.join(timeout=30)
        self.assertFalse(reader.is_alive())
        records = [json.loads(line) for line in b"".join(received).splitlines()]
        self.assertEqual([r["bytes_out"] for r in records], list(range(100)))
        self.assertEqual(lost, [])


def reference_line(facts: accesslog.RequestFacts) -> str:
    """What the line was when json built it from a dict: the formatted line must equal it."""
    record: dict[str, Any] = {
        "time": accesslog._timestamp_slow(facts.time),
        "client": facts.client,
        "method": facts.method,
        "host": facts.host,
        "path": facts.path,
        "query": facts.has_query,
        "status": facts.status,
        "completed": facts.completed,
        "bytes_in": facts.bytes_in,
        "bytes_out": facts.bytes_out,
        "duration_ms": round(facts.duration * 1000, 3),
        "account": facts.account,
        "project": facts.project,
        "form": facts.form,
        "port": facts.port,
    }
    for key, value in (
        ("backend", facts.backend_error),
        ("websocket_end", facts.websocket_end),
        ("share", facts.share),
    ):
        if value is not None:
            record[key] = value
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n"


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_MAYBE = st.none() | _TEXT
_TIMES = st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False) | st.sampled_from(
    [0.0, 1_700_000_000.0, 1_700_000_000.9995, 1_700_000_000.9999999, 1_699_999_999.999999]
)


class FormattedLikeJsonTests(unittest.TestCase):
    @settings(max_examples=400)
    @given(
        st.builds(
            accesslog.RequestFacts,
            time=_TIMES,
            client=_TEXT,
            method=_TEXT,
            host=_MAYBE,
            path=_TEXT,
            has_query=st.booleans(),
            status=st.integers(min_value=100, max_value=599),
            completed=st.booleans(),
            bytes_in=st.integers(min_value=0, max_value=2**63),
            bytes_out=st.integers(min_value=0, max_value=2**63),
            duration=st.floats(min_value=0, max_value=1e7, allow_nan=False) | st.just(0),
            account=_MAYBE,
            project=_MAYBE,
            form=_MAYBE,
            port=st.none() | st.integers(min_value=1, max_value=65535),
            backend_error=_MAYBE,
            websocket_end=_MAYBE,
            share=_MAYBE,
        )
    )
    def test_same_text_as_json(self, facts: accesslog.RequestFacts) -> None:
        self.assertEqual(accesslog.format_line(facts), reference_line(facts))

    @settings(max_examples=400)
    @given(st.lists(_TIMES, min_size=1, max_size=6))
    def test_timestamps_as_isoformat_in_any_order(self, times: list[float]) -> None:
        for when in sorted(times) + times:
            self.assertEqual(accesslog._timestamp(when), accesslog._timestamp_slow(when), when)

    def test_the_second_changes(self) -> None:
        stamps = accesslog._Timestamps()
        self.assertEqual(stamps(1_700_000_000.25), "2023-11-14T22:13:20.250Z")
        self.assertEqual(stamps(1_700_000_000.999), "2023-11-14T22:13:20.999Z")
        self.assertEqual(stamps(1_700_000_001.0), "2023-11-14T22:13:21.000Z")
        self.assertEqual(stamps(1_700_000_000.5), "2023-11-14T22:13:20.500Z")
        # Within a known second: truncated to the millisecond, as isoformat does.
        self.assertEqual(stamps(1_700_000_000.5006), "2023-11-14T22:13:20.500Z")
        self.assertEqual(stamps(1_700_000_000.5009), "2023-11-14T22:13:20.500Z")
        # ... after rounding to the microsecond first, as datetime does.
        self.assertEqual(stamps(1_700_000_000.2499999999), "2023-11-14T22:13:20.250Z")
        self.assertEqual(stamps(1_700_000_000.9999996), "2023-11-14T22:13:21.000Z")
