"""makeService: one MultiService holding the directory, every TLS listener and the redirect."""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from cocalcproxy import directory as directory_module
from cocalcproxy.directory import operations as ops
from cocalcproxy.directory.addresses import always_local
from cocalcproxy.directory.dialect import dialect_for
from cocalcproxy.directory.model import DirectoryError
from cocalcproxy.guard import build_guard, csrf
from cocalcproxy.handlers import backendio, backends, forward, raw, relay
from cocalcproxy.http import takeover
from cocalcproxy.http.ownpages import OwnPages
from cocalcproxy.http.redirect import RedirectResource
from cocalcproxy.http.site import ProxySite, Root
from cocalcproxy.ops import accesslog, eventloop, memory, systemd, tls, workers
from cocalcproxy.ops.nometrics import NoMetrics

if TYPE_CHECKING:
    from cocalcproxy.guard.identity import IdentityAssertions
    from cocalcproxy.ops.metrics import Metrics

# The namespace operators see in log lines (kept from before the package layout).
log = Logger(namespace="cocalcproxy.service")


class ListenerService(service.Service):
    """Listens on one endpoint; startService raises if the endpoint cannot be bound."""

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Any,
        label: str,
        own: backends.OwnListeners | None = None,
        adopt: tuple[int, int] | None = None,
    ) -> None:
        self.reactor = reactor
        self.description = description
        # (descriptor, address family) of a socket already listening, handed down by the
        # supervisor of worker processes (ops.workers): adopted instead of bound.
        self.adopt = adopt
        self.factory = factory
        self.label = label
        self.port: IListeningPort | None = None
        # The proxy's registry of its own endpoints, which no project route may reach.
        self.own = own
        self._unregister: Callable[[], None] | None = None
        # Fires once with the port or the failure; when_listening() hands out copies so that
        # every waiter sees the outcome (a consumed failure must not look like success).
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()
        self._outcome: Any = None
        self._waiters: list[defer.Deferred[IListeningPort]] = []
        self.listening.addBoth(self._settle)

    def _settle(self, outcome: Any) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)

    def _fire(self, waiter: defer.Deferred[IListeningPort]) -> None:
        if isinstance(self._outcome, Failure):
            waiter.errback(self._outcome)
        else:
            waiter.callback(self._outcome)

    def when_listening(self) -> defer.Deferred[IListeningPort]:
        waiter: defer.Deferred[IListeningPort] = defer.Deferred()
        if self.listening.called:
            self._fire(waiter)
        else:
            self._waiters.append(waiter)
        return waiter

    def startService(self) -> None:  # noqa: N802
        super().startService()
        try:
            if self.adopt is not None:
                endpoint: Any = _Adopted(self.reactor, *self.adopt)
                if self.description.split(":", 1)[0].lower() == "haproxy":
                    # The supervisor bound haproxy:...; the PROXY protocol is the worker's.
                    endpoint = proxyEndpoint(endpoint)
                d = endpoint.listen(self.factory)
            else:
                endpoint = serverFromString(self.reactor, self.description)
                d = endpoint.listen(self.factory)
        except Exception:
            # e.g. systemd:...:name=https when no such descriptor was passed (KeyError)
            d = defer.fail()

        def listening(port: Any) -> Any:
            self.port = port
            if self.own is not None:
                self._unregister = register_own(self.own, f"{self.label} listener", port.getHost())
            log.info(
                "{label} listening on {desc} ({host})",
                label=self.label,
                desc=self.description,
                host=str(port.getHost()),
            )
            self.listening.callback(port)
            return port

        def failed(failure: Any) -> None:
            log.critical(
                "cannot listen on {desc}: {why}",
                desc=self.description,
                why=failure.getErrorMessage(),
            )
            self.listening.errback(failure)
            if IReactorCore.providedBy(self.reactor):
                # Before reactor.run (twistd starts services first), stop as soon as it runs.
                if self.reactor.running:
                    self.reactor.stop()
                else:
                    self.reactor.callWhenRunning(self.reactor.stop)

        d.addCallbacks(listening, failed)

    def stopService(self) -> defer.Deferred[None] | None:  # noqa: N802
        super().stopService()
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self.port is not None:
            port: Any = self.port
            self.port = None
            stopped: defer.Deferred[None] = defer.maybeDeferred(port.stopListening)
            return stopped
        return None


@implementer(IStreamServerEndpoint)
class _Adopted:
    """A listening socket handed over by the supervisor (ops.workers), as an endpoint."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: Any) -> defer.Deferred[IListeningPort]:
        os.set_blocking(self.fd, False)  # Twisted accepts in a loop until EAGAIN
        adopted = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        os.close(self.fd)  # adoptStreamPort listens on a duplicate
        return defer.succeed(adopted)


def register_own(own: backends.OwnListeners, label: str, address: Any) -> Callable[[], None]:
    """Put a bound listener's address into the own-endpoint registry; returns the remover.

    A TCP listener is protected on every address of this machine (a route to 10.0.0.5:8443
    reaches a listener bound to 0.0.0.0:8443 just as well); a Unix one by its path.
    """
    port = getattr(address, "port", None)
    if isinstance(port, int):
        return own.add(label, port=port)
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    if isinstance(name, str) and name:
        return own.add(label, path=name)
    return lambda: None


def register_database(own: backends.OwnListeners, url: str) -> None:
    """The directory's PostgreSQL server is never a backend: its port on this machine (or on
    the addresses its host name resolves to now), or its Unix socket."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return
    try:
        port = parts.port or 5432
    except ValueError:
        return
    host = parts.hostname or ""
    if not host or host.startswith("/"):
        folder = host or "/var/run/postgresql"
        own.add("directory database", path=f"{folder}/.s.PGSQL.{port}")
        return
    if backendio.is_local_address(host) or always_local(host):
        own.add("directory database", port=port)
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        log.warn("cannot resolve the database host {host}", host=host)
        return
    for info in infos:
        address = str(info[4][0])
        if backendio.is_local_address(address):
            own.add("directory database", port=port)
        else:
            own.add("directory database", port=port, address=address)


class TrackingTLSFactory(TLSMemoryBIOFactory):
    """The TLS wrapper for one HTTPS listener, able to say when its last connection closed."""

    protocol = tls.LeanTLSProtocol

    def __init__(self, creator: Any, site: ProxySite) -> None:
        super().__init__(creator, False, site)  # type: ignore[arg-type]
        self._closed_waiters: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, protocol: Any) -> None:  # noqa: N802
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_closed(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if not self.protocols:
            d.callback(None)
        else:
            self._closed_waiters.append(d)
        return d


def _http_channel(tls_protocol: Any) -> Any:
    wrapped = getattr(tls_protocol, "wrappedProtocol", None)
    return getattr(wrapped, "_channel", wrapped)


class DrainService(service.Service):
    """Graceful end of the HTTPS side, run after the listeners stopped accepting.

    1. ``on_shutdown`` hooks run (the relay closes its WebSockets with a close frame);
    2. every ``SWEEP_INTERVAL`` seconds, connections without a request are closed (TLS
       close_notify, then TCP close without waiting for the peer's close_notify, as nginx does,
       so a silent client cannot hold the process), and busy ones are marked to close after
       their response (``Connection: close`` when the response has not started);
    3. all this until every HTTPS connection has closed and every hook has finished, at most
       ``timeout`` seconds; then whatever is left is aborted. Waiting on connections rather than
       on requests also covers a request whose body is still arriving.
    """

    SWEEP_INTERVAL = 0.1

    def __init__(
        self,
        reactor: Any,
        site: ProxySite,
        timeout: float,
        factories: list[TrackingTLSFactory] | None = None,
        on_shutdown: list[Callable[[], object]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.site = site
        self.timeout = timeout
        self.factories = factories if factories is not None else []
        self.on_shutdown = on_shutdown if on_shutdown is not None else []
        self._closing: set[Any] = set()

    def connections(self) -> list[Any]:
        return [p for factory in self.factories for p in list(factory.protocols)]

    def sweep(self) -> int:
        """Close connections with no request; make busy ones non-persistent. Returns busy count."""
        busy = 0
        for protocol in self.connections():
            channel = _http_channel(protocol)
            if isinstance(channel, takeover.TakenProtocol):
                busy += 1  # a relay's: the relay's own shutdown hook ends it
                continue
            requests = getattr(channel, "requests", None)
            if requests:
                busy += 1
                channel.persistent = False
                for request in requests:
                    if not request.startedWriting:
                        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            elif protocol not in self._closing:
                self._closing.add(protocol)
                if channel is not None and callable(getattr(channel, "loseConnection", None)):
                    # HTTPChannel.loseConnection unregisters itself as the transport's producer
                    # first; TLS would otherwise wait for that producer before closing.
                    channel.loseConnection()
                else:
                    protocol.loseConnection()
                wire = getattr(protocol, "transport", None)
                if wire is not None:
                    wire.loseConnection()
        return busy

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        return defer.ensureDeferred(self._drain())

    def _run_hook(self, hook: Callable[[], object]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.maybeDeferred(hook)

        def failed(failure: Failure) -> None:
            if not failure.check(defer.CancelledError):
                log.failure("shutdown hook failed", failure)

        return d.addErrback(failed)

    async def _drain(self) -> None:
        waits: list[defer.Deferred[Any]] = [self._run_hook(hook) for hook in self.on_shutdown]
        busy = self.sweep()
        if busy or self.site.in_flight:
            log.info(
                "waiting up to {t}s for {n} request(s) in flight",
                t=self.timeout,
                n=len(self.site.in_flight),
            )
        sweeper = task.LoopingCall(self.sweep)
        sweeper.clock = self.reactor
        sweeper.start(self.SWEEP_INTERVAL, now=False)
        waits.append(self.site.wait_idle())
        waits.extend(factory.wait_closed() for factory in self.factories)
        everything = defer.gatherResults(waits, consumeErrors=True)
        deadline = self.reactor.callLater(self.timeout, everything.cancel)
        try:
            await everything
        except (defer.CancelledError, defer.FirstError):
            pass
        finally:
            sweeper.stop()
        if deadline.active():
            deadline.cancel()
            return
        left = self.connections()
        log.warn(
            "shutdown timeout: closing {n} request(s) and {c} connection(s) still open",
            n=len(self.site.in_flight),
            c=len(left),
        )
        for request in list(self.site.in_flight):
            # A taken-over request (a relay's) has no channel any more, only its transport.
            transport = getattr(request.channel, "transport", None) or getattr(
                request, "transport", None
            )
            if transport is not None:
                transport.abortConnection()
        for protocol in left:
            protocol.abortConnection()
        closed = defer.gatherResults([f.wait_closed() for f in self.factories])
        closed.addTimeout(1.0, self.reactor)
        try:
            await closed
        except defer.TimeoutError:
            log.warn("connections still open after abort; stopping anyway")


class DirectoryService(service.Service):
    def __init__(self, directory: Any) -> None:
        self.directory = directory

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        return defer.maybeDeferred(self.directory.close)


class IdentityService(service.Service):
    """Re-reads (and when due rotates) the identity assertion keys while the proxy runs."""

    def __init__(self, identity: IdentityAssertions) -> None:
        self.identity = identity

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.identity.start()

    def stopService(self) -> defer.Deferred[Any]:  # noqa: N802
        super().stopService()
        return self.identity.stop()


class BackendPoolService(service.Service):
    """Closes the forwarder's idle backend connections on stop (after requests have drained)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        return defer.maybeDeferred(self.pool.closeCachedConnections)


#: Cyclic GC thresholds once the proxy serves (Python's default is 700, 10, 10). Measured with
#: bench/run.py (small GET, 16 connections, 3 rounds): 10,000 and 700 cost the same CPU per
#: request within noise (309 and 313 us) with the same p99 (7.9 and 7.8 ms); 50,000 made the
#: youngest generation's collections long enough to double the p99 (20.7 ms) for no gain.
GC_THRESHOLDS = (10_000, 10, 10)


def settle_gc() -> None:
    """Keep the start-up heap out of the cyclic GC, and collect young objects less often.

    A freshly started proxy holds some 65,000 long-lived objects the collector tracks (modules,
    TLS context, directory, caches' structures), and every full collection walked them all
    again; ``gc.freeze`` moves them to a generation that is never scanned. A request leaves
    dozens of container objects more than it frees by reference counting until it ends, so
    with Python's default threshold of 700 the youngest generation was collected every few
    requests; at 10,000 about every hundred (a short pause: see GC_THRESHOLDS for why not
    more). Reference cycles (Failures, Deferred chains) are still collected, only later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class ProxyService(service.MultiService):
    """The whole proxy.

    Stopping runs in phases, each waiting for the one before (MultiService alone would stop every
    child at once and close the directory under requests still in flight): tell systemd
    STOPPING=1; stop accepting (HTTPS and redirect listeners); drain (relays closed, requests in
    flight finished, connections closed, bounded by --shutdown-timeout); stop every other child;
    close the directory last; write out the access-log lines still waiting.
    """

    def __init__(self, reactor: Any, options: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.listeners: list[ListenerService] = []
        self.redirect_listener: ListenerService | None = None
        self.metrics_listener: ListenerService | None = None
        self.admin_api_listener: ListenerService | None = None
        self.tls_creator: tls.ReloadableServerCreator | None = None
        self.site: ProxySite | None = None
        # Without --metrics nobody can read them: NoMetrics, and prometheus_client is never
        # imported (memory at rest, and no counting on the request path).
        self.metrics: Metrics | NoMetrics = NoMetrics()
        if options.get("metrics"):
            from cocalcproxy.ops.metrics import Metrics

            self.metrics = Metrics()
        self.access_log: accesslog.AccessLog | None = None
        self.systemd: systemd.SystemdService | None = None
        # Called (no arguments, may return a Deferred) when draining starts: close relays etc.
        self.on_shutdown: list[Callable[[], object]] = []
        # The WebSocket relay: close_all() at shutdown, open_count() for metrics.
        self.relay: relay.Relay | None = None
        # The one registry of the proxy's own endpoints (listeners, database, and whatever an
        # admin API or worker adds): no project route reaches them (cocalcproxy.handlers.backends).
        self.own_listeners = backends.OwnListeners()
        self.backends: backendio.Backends | None = None
        # Set by the twistd plugin: a listener that cannot listen makes the process exit 1 (so
        # systemd's Restart=on-failure and the operator see a failure), not 0.
        self.exit_on_listen_failure = False
        # Set by the twistd plugin (each worker runs it too): once listening, settle_gc().
        # Not in tests that run the proxy inside the test process, whose GC is the runner's.
        self.settle_gc_when_listening = False
        # Set by the twistd plugin: the reactor dispatches events with cocalcproxy.ops.eventloop
        # (established connections first, no log context per event). Not in a test runner's.
        self.own_event_dispatch = False
        # In a worker process: its link to the supervisor.
        self.worker_link: workers.WorkerLink | None = None
        self._previous_hup: Any = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.own_event_dispatch and not eventloop.install(self.reactor):
            log.info("the reactor is not epoll: events are dispatched as Twisted does")
        if self.exit_on_listen_failure:
            self.all_listening().addErrback(self._listen_failed)
        if self.settle_gc_when_listening:
            self.all_listening().addCallbacks(lambda _: settle_gc(), lambda _: None)
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        if self.systemd is not None:
            self.systemd.notify_stopping()
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop_in_phases())

    async def _stop_in_phases(self) -> None:
        children = list(self)
        accepting = [*self.listeners, self.redirect_listener, self.admin_api_listener]
        last = [c for c in children if isinstance(c, DirectoryService)]
        phases: list[list[Any]] = [
            [c for c in children if c in accepting],
            [c for c in children if isinstance(c, DrainService)],
        ]
        taken = {id(c) for phase in phases for c in phase} | {id(c) for c in last}
        phases.append([c for c in reversed(children) if id(c) not in taken])
        phases.append(last)
        for phase in phases:
            results = await defer.DeferredList(
                [defer.maybeDeferred(child.stopService) for child in phase if child.running],
                consumeErrors=True,
            )
            for ok, result in results:
                if not ok:
                    log.failure("error while stopping", result)
        # Every request has ended: out with the access-log lines still waiting, and any later
        # one (a connection the reactor cuts at the very end) is written at once.
        if self.access_log is not None:
            self.access_log.end_buffering()
        # twistd re-raises the signal that stopped the reactor once it has shut down (exit status
        # -15); after a complete graceful stop we exit 0 instead, as the operations contract says.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        log.info("stopped cleanly")

    def _listen_failed(self, failure: Any) -> None:
        log.critical("not serving: a listener failed; exiting with status 1")

        def exit_1() -> None:
            sys.stdout.flush()
            os._exit(1)

        self.reactor.addSystemEventTrigger("after", "shutdown", exit_1)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP: re-read the certificate and reopen the access-log file."""
        if self.tls_creator is not None:
            self.reload_tls()
        if self.access_log is not None:
            self.access_log.reopen()

    def reload_tls(self) -> bool:
        assert self.tls_creator is not None
        return self.tls_creator.reload()

    def all_listening(self) -> defer.Deferred[list[Any]]:
        waits = [listener.when_listening() for listener in self.listeners]
        for extra in (self.redirect_listener, self.metrics_listener, self.admin_api_listener):
            if extra is not None:
                waits.append(extra.when_listening())
        return defer.gatherResults(waits, consumeErrors=True)

    def request_done(self, request: Any) -> None:
        """The site's hook: one access-log line and the request metrics, from the same facts."""
        try:
            facts = accesslog.facts_of(request, self.reactor.seconds())
            self.metrics.observe_request(facts)
            if self.access_log is not None:
                self.access_log.write(facts)
        except Exception:
            log.failure("access log / metrics failed for a request")


def build_service(options: Any, reactor: Any = None) -> ProxyService:
    """Assemble the proxy from parsed Options. Refuses bad TLS or database with UsageError."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    proxy = ProxyService(reactor, options)
    # Set when this process is one of --workers N (its listeners come from the supervisor).
    spec = workers.WorkerSpec.from_environ()

    prepare_state_dir(options["state-dir"])
    cert, key = options["tls-cert"], options["tls-key"]
    if not cert:
        cert, key = tls.ensure_self_signed(
            options["state-dir"], options["hostname"], options["project-domain"]
        )
    try:
        creator = tls.ReloadableServerCreator(cert, key)
    except tls.TLSConfigError as e:
        raise usage.UsageError(f"TLS: {e}") from None
    log.info(
        "TLS certificate {subject}, SHA-256 fingerprint {fingerprint}",
        subject=creator.material.subject,
        fingerprint=creator.material.fingerprint,
    )
    proxy.tls_creator = creator

    _check_database_folder(options["database"])
    try:
        opened = directory_module.open_directory(options["database"], reactor)
    except directory_module.DirectoryError as e:
        raise usage.UsageError(f"cannot open the directory: {e}") from None
    if options["admin-api"]:
        try:
            _refuse_unauthenticated_admin_api(opened)
        except BaseException:
            opened.close()
            raise
    # Everything but DirectoryService sees the timed wrapper (directory query latency metric).
    directory = cast(directory_module.IDirectory, opened)
    if not isinstance(proxy.metrics, NoMetrics):
        from cocalcproxy.ops.metrics import TimedDirectory

        directory = cast(directory_module.IDirectory, TimedDirectory(opened, proxy.metrics))

    oidc = options["oidc"]
    if oidc is not None:
        try:
            oidc = oidc.with_secret()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
    provider_http, provider_pool = (
        _provider_http(reactor) if options["oidc"] is not None else (None, None)
    )
    try:
        form_key = csrf.shared_key(cast(Any, opened).sync, options["state-dir"])
    except (directory_module.DirectoryError, ValueError) as e:
        opened.close()
        raise usage.UsageError(f"cannot load the form key from the directory: {e}") from None
    guard, guard_pages, guard_service = build_guard(
        directory,
        reactor,
        key=form_key,
        session_lifetime_days=options["session-lifetime"],
        project_domain=options["project-domain"],
        metrics=proxy.metrics,
        hostname=options["hostname"],
        public_port=lambda: _public_https_port(options, proxy),
        change_listener=opened.change_listener,
        password_login=options["password-login"] == "on",
        oidc=oidc,
        http=provider_http,
        outage_grace=options["directory-grace"],
        sharing=sharing_policy(options),
    )
    identity: IdentityAssertions | None = None
    if options["identity-assertion"]:
        # Imported only when enabled: joserfc stays out of the memory of a proxy without it.
        from cocalcproxy.guard.identity import IdentityAssertions

        identity = IdentityAssertions(
            opened,
            reactor,
            hostname=options["hostname"],
            project_domain=options["project-domain"],
            public_port=lambda: _public_https_port(options, proxy),
        )
        try:
            identity.prepare(cast(Any, opened).sync)
        except directory_module.DirectoryError as e:
            raise usage.UsageError(f"cannot load the identity assertion keys: {e}") from None
    register_database(proxy.own_listeners, options["database"])
    backend_policy = backendio.Backends(
        reactor,
        backends.Policy(
            default_ports=options["default-ports"],
            deny_ports=options["deny-ports"],
            own=proxy.own_listeners,
        ),
        connect_timeout=options["backend-connect-timeout"],
    )
    proxy.backends = backend_policy
    backend_pool = forward.make_pool(reactor, options["backend-pool-size"])
    forwarder = forward.Forwarder(
        reactor,
        pool=backend_pool,
        connect_timeout=options["backend-connect-timeout"],
        response_timeout=options["backend-response-timeout"],
        public_hosts=[options["hostname"].encode("idna")],
        backends=backend_policy,
    )
    websocket_relay = relay.Relay(
        reactor,
        connect_timeout=options["backend-connect-timeout"],
        response_timeout=options["backend-response-timeout"],
        idle_timeout=options["websocket-idle-timeout"],
        public_hostname=options["hostname"],
        backends=backend_policy,
    )
    proxy.relay = websocket_relay
    root = Root(
        guard=backendio.PolicyGuard(guard, backend_policy),
        forwarder=forwarder,
        relay=websocket_relay,
        raw=raw.RawHandler(reactor),
        own_pages=OwnPages(directory, guard_pages, identity),
        project_domain=options["project-domain"],
        main_host=options["hostname"],
        identity=identity.assertion if identity is not None else None,
        absolute_url_redirect=options["absolute-url-redirect"],
    )
    site = ProxySite(root, reactor=reactor)
    site.hsts_max_age = options["hsts-max-age"]
    site.max_body_size = options["max-body-size"]
    site.request_head_timeout = options["request-head-timeout"]
    proxy.site = site
    site.metrics = proxy.metrics
    # Common proxied requests skip Twisted's HTTP server machinery (cocalcproxy.http.lane).
    site.lane_enabled = True
    site.on_request_done.append(proxy.request_done)
    if options["access-log"] != "off":
        try:
            proxy.access_log = accesslog.AccessLog(
                options["access-log"],
                on_lost=proxy.metrics.access_log_lines_lost,
                pipe_fd=spec.access_log_fd if spec is not None else None,
                clock=reactor,
            )
        except OSError as e:
            raise usage.UsageError(
                f"--access-log {options['access-log']}: cannot open it: {e.strerror}"
            ) from None
    proxy.metrics.set_in_flight(lambda: len(site.in_flight))
    proxy.metrics.set_certificate_expiry(lambda: creator.material.not_after.timestamp())
    relay_handler = root.relay
    if callable(getattr(relay_handler, "close_all", None)):
        proxy.on_shutdown.append(relay_handler.close_all)  # type: ignore[attr-defined]
    if callable(getattr(relay_handler, "open_count", None)):
        proxy.metrics.set_websocket_relays(relay_handler.open_count)  # type: ignore[attr-defined]

    DirectoryService(opened).setServiceParent(proxy)
    guard_service.setServiceParent(proxy)
    memory.IdleTrim(reactor).setServiceParent(proxy)
    BackendPoolService(backend_pool).setServiceParent(proxy)
    if provider_pool is not None:
        BackendPoolService(provider_pool).setServiceParent(proxy)
    if identity is not None:
        IdentityService(identity).setServiceParent(proxy)
    factories: list[TrackingTLSFactory] = []
    DrainService(
        reactor, site, options["shutdown-timeout"], factories, proxy.on_shutdown
    ).setServiceParent(proxy)
    for number, description in enumerate(options["listen"]):
        factory = TrackingTLSFactory(creator, site)
        factories.append(factory)
        listener = ListenerService(
            reactor,
            description,
            factory,
            "HTTPS",
            proxy.own_listeners,
            adopt=spec.listen[number] if spec is not None else None,
        )
        listener.setServiceParent(proxy)
        proxy.listeners.append(listener)
    if options["redirect-http"]:
        redirect_site = accesslog.QuietSite(
            RedirectResource(options["hostname"], _https_port(options)), reactor=reactor
        )
        redirect_site.displayTracebacks = False
        redirect_site.request_head_timeout = options["request-head-timeout"]
        proxy.redirect_listener = ListenerService(
            reactor,
            options["redirect-http"],
            redirect_site,
            "HTTP redirect",
            proxy.own_listeners,
            adopt=spec.redirect if spec is not None else None,
        )
        proxy.redirect_listener.setServiceParent(proxy)
    if spec is not None:
        # The supervisor serves --metrics (the sum of all workers); no route may reach it.
        for label, port, path in spec.own:
            proxy.own_listeners.add(label, port=port, path=path)
    elif options["metrics"] and not isinstance(proxy.metrics, NoMetrics):
        from cocalcproxy.ops.metrics import metrics_site as make_metrics_site

        metrics_site = make_metrics_site(proxy.metrics, reactor)
        metrics_site.request_head_timeout = options["request-head-timeout"]  # type: ignore[attr-defined]
        proxy.metrics_listener = ListenerService(
            reactor,
            options["metrics"],
            metrics_site,
            "Prometheus metrics",
            proxy.own_listeners,
        )
        proxy.metrics_listener.setServiceParent(proxy)
    if options["admin-api"]:
        _admin_api(
            proxy, options, opened, creator, reactor, spec.admin_api if spec is not None else None
        )
    if spec is not None:
        # A worker tells its supervisor, not systemd, that it listens, and sends heartbeats.
        proxy.worker_link = workers.WorkerLink(
            reactor, spec, proxy.all_listening, tick=[proxy.metrics.refresh]
        )
        proxy.worker_link.setServiceParent(proxy)
    else:
        proxy.systemd = systemd.SystemdService(reactor, proxy.all_listening)
        proxy.systemd.setServiceParent(proxy)
    return proxy


def _check_database_folder(url: str) -> None:
    """A SQLite database may be created at the first start, but never in a folder that does not
    exist: that is a typo in --database, not a wish for a new, empty directory."""
    if not url.lower().startswith("sqlite:"):
        return
    try:
        path = getattr(dialect_for(url), "path", None)
    except DirectoryError as e:
        raise usage.UsageError(f"--database: {e}") from None
    folder = os.path.dirname(path) if path else None
    if folder and not os.path.isdir(folder):
        raise usage.UsageError(f"--database {url}: the folder {folder} does not exist")


def prepare_state_dir(path: str) -> None:
    """Create the state directory (0700) if missing, and refuse one the proxy cannot use, with
    one line naming the option, before anything inside it is touched."""
    where = f"--state-dir {path}"
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise usage.UsageError(f"{where}: not a directory") from None
    except OSError as e:
        raise usage.UsageError(f"{where}: cannot create it: {e.strerror}") from None
    if not os.path.isdir(path):
        raise usage.UsageError(f"{where}: not a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise usage.UsageError(f"{where}: not readable and writable by this user")


def _provider_http(reactor: Any) -> tuple[Any, Any]:
    """The HTTP client for the OpenID provider (its own pool, closed at stop; the system's
    trusted CAs), and that pool."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    return HTTPClient(cast(Any, Agent(reactor, pool=pool, connectTimeout=10))), pool


def sharing_policy(options: Any) -> ops.SharingPolicy:
    return ops.SharingPolicy(options["allow-sharing"], options["project-domain"])


def _refuse_unauthenticated_admin_api(opened: Any) -> None:
    """--admin-api is refused (UsageError) while no admin token exists: serving it without
    authentication is never an option, and with no token it would serve nobody."""
    try:
        tokens = opened.sync.count_admin_tokens()
    except directory_module.DirectoryError as e:
        raise usage.UsageError(f"--admin-api: cannot read admin tokens: {e}") from None
    if tokens == 0:
        raise usage.UsageError(
            "--admin-api needs an admin token to authenticate requests and none exists: "
            "create one with 'cocalcproxy admin-token create' (same --state-dir/--database), "
            "then start the proxy again"
        )


def _admin_api(
    proxy: ProxyService,
    options: Any,
    opened: Any,
    creator: Any,
    reactor: Any,
    adopt: tuple[int, int] | None = None,
) -> None:
    """The admin API listener: TLS with the proxy's certificate unless loopback or Unix.
    ``ops.adminapi`` is imported only here, when ``--admin-api`` is on."""
    from cocalcproxy.ops import adminapi

    site: Any = adminapi.api_site(opened, sharing_policy(options), reactor)
    site.request_head_timeout = options["request-head-timeout"]
    description = options["admin-api"]
    factory = TLSMemoryBIOFactory(creator, False, site) if adminapi.needs_tls(description) else site
    # Registered among the proxy's own listeners: no project route can ever reach it.
    proxy.admin_api_listener = ListenerService(
        reactor, description, factory, "admin API", proxy.own_listeners, adopt=adopt
    )
    proxy.admin_api_listener.setServiceParent(proxy)


def _https_port(options: Any) -> int | None:
    """The public HTTPS port for redirects: 443 is implied; the first tcp listener's otherwise."""
    port = _listen_port(options)
    return None if port in (None, 0, 443) else port


def _public_https_port(options: Any, proxy: ProxyService) -> int | None:
    """Like ``_https_port``, but a listener on port 0 (tests) counts with its bound port."""
    if _listen_port(options) == 0 and proxy.listeners:
        bound: Any = proxy.listeners[0].port
        if bound is not None:
            address: Any = bound.getHost()
            port = int(address.port)
            return None if port == 443 else port
    return _https_port(options)


def _listen_port(options: Any) -> int | None:
    """The port of the first tcp listener as configured (0 for any), or None. A listener that
    takes the PROXY protocol (``haproxy:tcp:...``) counts by the port it wraps."""
    for description in options["listen"]:
        parts = description.split(":")
        if parts[0] == "haproxy":
            parts = parts[1:]
        if parts[0] in ("tcp", "tcp6", "ssl") and len(parts) > 1:
            for part in parts[1:]:
                value = part.split("=", 1)[1] if part.startswith("port=") else part
                if value.isdigit():
                    return int(value)
    return None
