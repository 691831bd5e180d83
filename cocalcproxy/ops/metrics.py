"""Prometheus metrics: one ``Metrics`` object per proxy, on a private registry.

Other parts of the proxy report through small methods, so none of them imports prometheus_client:

* ``backend_failure(reason)``: a backend connection could not be made or broke. Handlers need
  not call it: a request whose ``log_info.extra["backend"]`` names a reason (the forwarder sets
  "refused", "connect-timeout", "response-timeout", "no-response", "error", "failed-mid-body",
  "head-too-large")
  is counted from the request-done hook. Reasons must come from a fixed vocabulary.
* ``access_log_lines_lost(lines)``: access-log lines that could not be written.
* ``signin_failure()``: a wrong name, password, token or session at sign-in (guard).
* ``cache_hit(cache)`` / ``cache_miss(cache)``: decision caches (guard); ``cache`` is a fixed
  name such as "account" or "project".
* ``observe_directory_query(operation, seconds)``: or wrap the directory in ``TimedDirectory``.
* ``set_websocket_relays(count)``: a function returning the number of open relays (relay).
* ``set_certificate_expiry(when)``: a function returning the expiry as a Unix timestamp.

Requests themselves are counted by ``observe_request``, fed from the site's request-done hook
with the same facts the access log writes. Label values come from small fixed sets (URL form,
status code), never from paths, names or ids, so the number of series stays bounded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.web import resource, server

from cocalcproxy.ops.accesslog import QuietSite, RequestFacts

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DIRECTORY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FORMS = frozenset({"server", "port", "raw", "own"})


def form_label(form: str | None) -> str:
    return form if form in FORMS else "none"


def status_label(facts: RequestFacts) -> str:
    return str(facts.status) if facts.completed else "disconnected"


class _Children:
    """The labelled children of one metric, each looked up once.

    ``metric.labels(...)`` validates its arguments and takes a lock on every call, which showed
    in profiles of small requests; the child it returns is the same object every time, so it is
    kept here by label values. Label values come from small fixed sets, so this stays small.
    """

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """The proxy's metrics. In a worker of ``--workers N`` (``$PROMETHEUS_MULTIPROC_DIR`` set
    before prometheus_client was imported) every value goes to the multiprocess files the
    supervisor sums; gauges fed by a function are then set from it by ``refresh()``, which the
    worker's heartbeat calls every second (each gauge says how workers' values combine)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._functions: list[tuple[Any, Callable[[], float]]] = []
        r = self.registry
        self.requests = Counter(
            "cocalcproxy_requests",
            "Requests answered, by URL form and status (or 'disconnected').",
            ["form", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "cocalcproxy_request_duration_seconds",
            "Time from the request reaching the proxy to its end, by URL form.",
            ["form"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(
            "cocalcproxy_request_body_bytes",
            "Request body bytes received from clients (and relayed upstream), by URL form.",
            ["form"],
            registry=r,
        )
        self.bytes_out = Counter(
            "cocalcproxy_response_body_bytes",
            "Response body bytes sent to clients (and relayed downstream), by URL form.",
            ["form"],
            registry=r,
        )
        self.in_flight = Gauge(
            "cocalcproxy_requests_in_flight",
            "Requests being handled now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.websocket_relays = Gauge(
            "cocalcproxy_websocket_relays_open",
            "Open WebSocket relays.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._set_function(self.websocket_relays, lambda: 0.0)
        self.backend_failures = Counter(
            "cocalcproxy_backend_connection_failures",
            "Backend connections that could not be made or broke, by reason.",
            ["reason"],
            registry=r,
        )
        self.shared_requests = Counter(
            "cocalcproxy_shared_requests",
            "Requests let in through a shared port (not as a member), by visibility.",
            ["visibility"],
            registry=r,
        )
        self.signin_failures = Counter(
            "cocalcproxy_signin_failures",
            "Failed sign-ins and rejected credentials.",
            registry=r,
        )
        self.cache_hits = Counter(
            "cocalcproxy_cache_hits", "Decision cache hits, by cache.", ["cache"], registry=r
        )
        self.cache_misses = Counter(
            "cocalcproxy_cache_misses", "Decision cache misses, by cache.", ["cache"], registry=r
        )
        self.directory_query = Histogram(
            "cocalcproxy_directory_query_seconds",
            "Directory call latency, by operation.",
            ["operation"],
            buckets=DIRECTORY_BUCKETS,
            registry=r,
        )
        self._requests = _Children(self.requests)
        self._request_duration = _Children(self.request_duration)
        self._bytes_in = _Children(self.bytes_in)
        self._bytes_out = _Children(self.bytes_out)
        self._backend_failures = _Children(self.backend_failures)
        self._cache_hits = _Children(self.cache_hits)
        self._cache_misses = _Children(self.cache_misses)
        self._directory_query = _Children(self.directory_query)
        self.directory_up = Gauge(
            "cocalcproxy_directory_up",
            "1 while the directory answers, 0 during an outage (cached decisions may still be "
            "used for --directory-grace seconds).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self._set_function(self.directory_up, lambda: 1.0)
        self.access_log_lost = Counter(
            "cocalcproxy_access_log_lines_lost",
            "Access-log lines that could not be written (full disk, file not open).",
            registry=r,
        )
        self.directory_notifications = Gauge(
            "cocalcproxy_directory_notifications_up",
            "1 while the directory's change notifications are heard (PostgreSQL LISTEN), "
            "else 0 (SQLite has none: changes are polled once a second).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.certificate_expiry = Gauge(
            "cocalcproxy_tls_certificate_expiry_timestamp_seconds",
            "When the served TLS certificate expires (Unix time).",
            registry=r,
            multiprocess_mode="livemin",
        )

    # reporting API for the other parts of the proxy

    def observe_request(self, facts: RequestFacts) -> None:
        form = form_label(facts.form)
        self._requests(form, status_label(facts)).inc()
        self._request_duration(form).observe(facts.duration)
        if facts.bytes_in:
            self._bytes_in(form).inc(facts.bytes_in)
        if facts.bytes_out:
            self._bytes_out(form).inc(facts.bytes_out)
        if facts.backend_error is not None:
            self.backend_failure(facts.backend_error)
        if facts.share in ("link", "public"):
            self.shared_requests.labels(facts.share).inc()

    def backend_failure(self, reason: str = "other") -> None:
        self._backend_failures(reason).inc()

    def signin_failure(self) -> None:
        self.signin_failures.inc()

    def access_log_lines_lost(self, lines: int) -> None:
        self.access_log_lost.inc(lines)

    def cache_hit(self, cache: str) -> None:
        self._cache_hits(cache).inc()

    def cache_miss(self, cache: str) -> None:
        self._cache_misses(cache).inc()

    def observe_directory_query(self, operation: str, seconds: float) -> None:
        self._directory_query(operation).observe(seconds)

    def set_websocket_relays(self, count: Callable[[], int]) -> None:
        self._set_function(self.websocket_relays, lambda: float(count()))

    def set_directory_notifications(self, up: Callable[[], bool]) -> None:
        self._set_function(self.directory_notifications, lambda: 1.0 if up() else 0.0)

    def set_directory_up(self, up: Callable[[], bool]) -> None:
        self._set_function(self.directory_up, lambda: 1.0 if up() else 0.0)

    def set_in_flight(self, count: Callable[[], int]) -> None:
        self._set_function(self.in_flight, lambda: float(count()))

    def set_certificate_expiry(self, when: Callable[[], float]) -> None:
        self._set_function(self.certificate_expiry, when)

    def _set_function(self, gauge: Any, function: Callable[[], float]) -> None:
        if not self.multiprocess:
            gauge.set_function(function)
            return
        self._functions = [(g, f) for g, f in self._functions if g is not gauge]
        self._functions.append((gauge, function))
        gauge.set(function())

    def refresh(self) -> None:
        """Multiprocess mode: write the function-fed gauges' values (a no-op otherwise)."""
        for gauge, function in self._functions:
            gauge.set(function())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class TimedDirectory:
    """Wraps a directory so that every Deferred-returning call feeds ``directory_query``.

    Attribute access passes through, so callers see the same interface; the operation label is
    the method name (a fixed set).
    """

    def __init__(
        self, directory: Any, metrics: Metrics, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._directory = directory
        self._metrics = metrics
        self._now = now

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._directory, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = self._now()
            result = attribute(*args, **kwargs)
            if isinstance(result, defer.Deferred):

                def observe(outcome: object) -> object:
                    self._metrics.observe_directory_query(name, self._now() - started)
                    return outcome

                result.addBoth(observe)
            return result

        return timed


class Summed:
    """The supervisor's view of ``--workers N``: the sum of every worker's metric files."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.registry: CollectorRegistry | None = None

    def exposition(self) -> bytes:
        if self.registry is None:
            # Made at the first scrape: the folder is created once privileges are dropped,
            # after this listener was bound.
            from prometheus_client import multiprocess

            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry, path=self.folder)
        return generate_latest(self.registry)


class MetricsResource(resource.Resource):
    """``/metrics`` in the Prometheus text format; everything else is 404."""

    isLeaf = True

    def __init__(self, metrics: Metrics | Summed) -> None:
        super().__init__()
        self.metrics = metrics

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not found: metrics are at /metrics\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Use GET.\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()


def multiprocess_site(folder: str, reactor: Any) -> server.Site:
    return metrics_site(Summed(folder), reactor)


def metrics_site(metrics: Metrics | Summed, reactor: Any) -> server.Site:
    site = QuietSite(MetricsResource(metrics), reactor=reactor)
    site.displayTracebacks = False
    return site
