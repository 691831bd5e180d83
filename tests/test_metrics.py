"""Prometheus metrics: the reporting API, the directory timer, and a real scrape of /metrics."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from cocalcproxy.ops import metrics
from tests.processes import free_port
from tests.support import https_client, plain_client, start_proxy
from tests.test_accesslog import sample, use_quiet_directory


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: metrics.Metrics, name: str, **labels: str) -> float:
    return samples(m.exposition().decode()).get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsTests(unittest.TestCase):
    def test_private_registries_do_not_collide(self) -> None:
        a, b = metrics.Metrics(), metrics.Metrics()
        a.signin_failure()
        self.assertEqual(value(a, "cocalcproxy_signin_failures_total"), 1)
        self.assertEqual(value(b, "cocalcproxy_signin_failures_total"), 0)

    def test_request_facts(self) -> None:
        m = metrics.Metrics()
        m.observe_request(sample(status=200, bytes_in=10, bytes_out=1234, duration=0.02))
        m.observe_request(sample(status=502, form="port", duration=3))
        m.observe_request(sample(completed=False, form=None))
        self.assertEqual(value(m, "cocalcproxy_requests_total", form="server", status="200"), 1)
        self.assertEqual(value(m, "cocalcproxy_requests_total", form="port", status="502"), 1)
        self.assertEqual(
            value(m, "cocalcproxy_requests_total", form="none", status="disconnected"), 1
        )
        self.assertEqual(value(m, "cocalcproxy_request_body_bytes_total", form="server"), 10)
        self.assertEqual(value(m, "cocalcproxy_response_body_bytes_total", form="server"), 1234)
        self.assertEqual(
            value(m, "cocalcproxy_request_duration_seconds_bucket", form="server", le="0.025"), 1
        )
        self.assertEqual(
            value(m, "cocalcproxy_request_duration_seconds_bucket", form="port", le="2.5"), 0
        )
        self.assertEqual(
            value(m, "cocalcproxy_request_duration_seconds_bucket", form="port", le="5.0"), 1
        )

    def test_backend_error_counted_from_request_facts(self) -> None:
        m = metrics.Metrics()
        m.observe_request(sample(status=502, backend_error="refused"))
        m.observe_request(sample(status=200))
        self.assertEqual(
            value(m, "cocalcproxy_backend_connection_failures_total", reason="refused"), 1
        )

    def test_unknown_form_does_not_create_series(self) -> None:
        m = metrics.Metrics()
        m.observe_request(sample(form="/etc/passwd"))
        self.assertEqual(value(m, "cocalcproxy_requests_total", form="none", status="200"), 1)

    def test_component_api(self) -> None:
        m = metrics.Metrics()
        m.backend_failure("refused")
        m.backend_failure("refused")
        m.cache_hit("project")
        m.cache_miss("project")
        m.cache_miss("project")
        m.observe_directory_query("project_for", 0.003)
        relays = [3]
        m.set_websocket_relays(lambda: relays[0])
        m.set_certificate_expiry(lambda: 1_900_000_000.0)
        self.assertEqual(
            value(m, "cocalcproxy_backend_connection_failures_total", reason="refused"), 2
        )
        self.assertEqual(value(m, "cocalcproxy_cache_hits_total", cache="project"), 1)
        self.assertEqual(value(m, "cocalcproxy_cache_misses_total", cache="project"), 2)
        self.assertEqual(
            value(m, "cocalcproxy_directory_query_seconds_count", operation="project_for"), 1
        )
        self.assertEqual(value(m, "cocalcproxy_websocket_relays_open"), 3)
        relays[0] = 0
        self.assertEqual(value(m, "cocalcproxy_websocket_relays_open"), 0)
        self.assertEqual(
            value(m, "cocalcproxy_tls_certificate_expiry_timestamp_seconds"), 1_900_000_000
        )

    def test_timed_directory(self) -> None:
        clock = task.Clock()
        m = metrics.Metrics()
        pending: defer.Deferred[str] = defer.Deferred()

        class Directory:
            flavour = "sqlite"

            def get_project(self, pid: str) -> defer.Deferred[str]:
                return pending

            def plain(self) -> int:
                return 7

        timed: Any = metrics.TimedDirectory(Directory(), m, clock.seconds)
        self.assertEqual(timed.flavour, "sqlite")
        self.assertEqual(timed.plain(), 7)
        d = timed.get_project("x")
        clock.advance(0.2)
        pending.callback("found")
        self.assertEqual(self.successResultOf(d), "found")
        self.assertEqual(
            value(
                m, "cocalcproxy_directory_query_seconds_bucket", operation="get_project", le="0.25"
            ),
            1,
        )
        self.assertEqual(
            value(
                m, "cocalcproxy_directory_query_seconds_bucket", operation="get_project", le="0.1"
            ),
            0,
        )

    def test_timed_directory_times_failures_too(self) -> None:
        m = metrics.Metrics()

        class Directory:
            def ping(self) -> defer.Deferred[None]:
                return defer.fail(RuntimeError("database is locked"))

        timed: Any = metrics.TimedDirectory(Directory(), m)
        self.failureResultOf(timed.ping(), RuntimeError)
        self.assertEqual(value(m, "cocalcproxy_directory_query_seconds_count", operation="ping"), 1)


class ScrapeTests(unittest.TestCase):
    """A real proxy with --metrics: HTTPS requests, then a plain-HTTP scrape of /metrics."""

    @defer.inlineCallbacks
    def test_scrape(self):  # type: ignore[no-untyped-def]
        use_quiet_directory(self)
        proxy = yield start_proxy(self, "--metrics", "tcp:0:interface=127.0.0.1")
        client = https_client(self, proxy.cert_path)
        for path in ("/_/health", "/_/health", "/nothing-here"):
            response = yield client.get(proxy.url + path)
            yield response.content()
        port = proxy.service.metrics_listener.port.getHost().port
        scraper = plain_client(self)
        response = yield scraper.get(f"http://127.0.0.1:{port}/metrics")
        text = yield response.text()
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        found = samples(text)
        self.assertEqual(
            found[("cocalcproxy_requests_total", (("form", "own"), ("status", "200")))], 2
        )
        self.assertEqual(
            found[("cocalcproxy_requests_total", (("form", "none"), ("status", "404")))], 1
        )
        self.assertGreater(found[("cocalcproxy_response_body_bytes_total", (("form", "own"),))], 0)
        expiry = found[("cocalcproxy_tls_certificate_expiry_timestamp_seconds", ())]
        now = datetime.datetime.now(datetime.timezone.utc).timestamp()
        self.assertGreater(expiry, now + 86400 * 365)
        self.assertIn(("cocalcproxy_websocket_relays_open", ()), found)
        self.assertEqual(found[("cocalcproxy_requests_in_flight", ())], 0)

        other = yield scraper.get(f"http://127.0.0.1:{port}/metrics/../secret")
        yield other.content()
        self.assertEqual(other.code, 404)
        post = yield scraper.post(f"http://127.0.0.1:{port}/metrics", data=b"")
        yield post.content()
        self.assertEqual(post.code, 405)


class GuardMetricsTests(unittest.TestCase):
    """The guard reports sign-in failures and its cache hits and misses to the proxy's metrics."""

    @defer.inlineCallbacks
    def test_signin_failures_and_cache(self):  # type: ignore[no-untyped-def]
        proxy = yield start_proxy(self, "--metrics", "tcp:0:interface=127.0.0.1")
        yield proxy.directory.add_user("alice", "alice-password")
        project = yield proxy.directory.add_project("alice")
        # Let the guard's once-a-second poll see those writes first, so it drops no cache later.
        guard = proxy.service.site.resource.guard
        counter = yield proxy.directory.change_counter()
        deadline = reactor.seconds() + 10
        while guard.last_counter != counter:
            self.assertLess(reactor.seconds(), deadline, "the guard never polled the counter")
            yield task.deferLater(reactor, 0.05, lambda: None)
        client = https_client(self, proxy.cert_path)
        url = f"{proxy.url}/{project.id}/server/{free_port()}/"
        wrong = yield client.get(url, auth=("alice", "not-her-password"))
        yield wrong.content()
        self.assertEqual(wrong.code, 401)
        for _ in range(3):
            right = yield client.get(url, auth=("alice", "alice-password"))
            yield right.content()
            self.assertEqual(right.code, 502, "authorised; nothing listens on that port")
        port = proxy.service.metrics_listener.port.getHost().port
        response = yield plain_client(self).get(f"http://127.0.0.1:{port}/metrics")
        found = samples((yield response.text()))
        self.assertEqual(found[("cocalcproxy_signin_failures_total", ())], 1)
        hits = found[("cocalcproxy_cache_hits_total", (("cache", "credentials"),))]
        misses = found[("cocalcproxy_cache_misses_total", (("cache", "credentials"),))]
        self.assertEqual((misses, hits), (2, 2), "wrong and first right miss; later rights hit")
        self.assertEqual(found[("cocalcproxy_cache_misses_total", (("cache", "access"),))], 1)
        self.assertEqual(found[("cocalcproxy_cache_hits_total", (("cache", "access"),))], 2)


class BackendFailureTests(unittest.TestCase):
    """The real forwarder, directory and guard: a backend that refuses shows in log and metrics."""

    @defer.inlineCallbacks
    def test_refused_backend(self):  # type: ignore[no-untyped-def]
        log_path = os.path.abspath(self.mktemp())
        proxy = yield start_proxy(
            self, "--metrics", "tcp:0:interface=127.0.0.1", "--access-log", log_path
        )
        yield proxy.directory.add_user("carol", "a long enough password")
        project = yield proxy.directory.add_project("carol")
        _, token = yield proxy.directory.create_token("carol")
        closed = free_port()
        client = https_client(self, proxy.cert_path)
        response = yield client.get(
            f"{proxy.url}/{project.id}/server/{closed}/?token=hidden",
            headers={"Authorization": f"Bearer {token}"},
        )
        yield response.content()
        self.assertEqual(response.code, 502)

        port = proxy.service.metrics_listener.port.getHost().port
        scraped = yield plain_client(self).get(f"http://127.0.0.1:{port}/metrics")
        found = samples((yield scraped.text()))
        self.assertEqual(
            found[("cocalcproxy_backend_connection_failures_total", (("reason", "refused"),))], 1
        )
        self.assertEqual(
            found[("cocalcproxy_requests_total", (("form", "server"), ("status", "502")))], 1
        )
        self.assertGreater(
            found[("cocalcproxy_directory_query_seconds_count", (("operation", "project_for"),))]
            + found.get(
                (
                    "cocalcproxy_directory_query_seconds_count",
                    (("operation", "account_for_token"),),
                ),
                0,
            ),
            0,
        )
        proxy.service.access_log.flush()  # not waiting up to 100 ms for the line
        with open(log_path) as f:
            (line,) = [json.loads(x) for x in f]
        self.assertEqual(line["backend"], "refused")
        self.assertEqual(line["account"], "carol")
        self.assertEqual(line["project"], project.id)
        self.assertEqual(line["form"], "server")
        self.assertEqual(line["port"], closed)
        self.assertNotIn(token, json.dumps(line))
