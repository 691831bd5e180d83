"""makeService: one MultiService holding the directory, every TLS listener and the redirect."""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web import server

from cocalcproxy import directory as directory_module
from cocalcproxy import forward, raw, relay, tls
from cocalcproxy.guard import build_guard
from cocalcproxy.ownpages import OwnPages
from cocalcproxy.redirect import RedirectResource
from cocalcproxy.site import ProxySite, Root

log = Logger()


class ListenerService(service.Service):
    """Listens on one endpoint; startService raises if the endpoint cannot be bound."""

    def __init__(self, reactor: Any, description: str, factory: Any, label: str) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.label = label
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:  # noqa: N802
        super().startService()
        endpoint = serverFromString(self.reactor, self.description)
        d = endpoint.listen(self.factory)

        def listening(port: Any) -> Any:
            self.port = port
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
            if IReactorCore.providedBy(self.reactor) and self.reactor.running:
                self.reactor.stop()

        d.addCallbacks(listening, failed)
        if d.called and not self.listening.called:
            pass

    def stopService(self) -> defer.Deferred[None] | None:  # noqa: N802
        super().stopService()
        if self.port is not None:
            port: Any = self.port
            self.port = None
            stopped: defer.Deferred[None] = defer.maybeDeferred(port.stopListening)
            return stopped
        return None


class DrainService(service.Service):
    """On stop (after the listeners stopped), waits for requests in flight, at most ``timeout``."""

    def __init__(self, reactor: Any, site: ProxySite, timeout: float) -> None:
        self.reactor = reactor
        self.site = site
        self.timeout = timeout

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        waiting = self.site.wait_idle()
        if not waiting.called:
            log.info(
                "waiting up to {t}s for {n} request(s) in flight",
                t=self.timeout,
                n=len(self.site.in_flight),
            )
        waiting.addTimeout(self.timeout, self.reactor)

        def give_up(failure: Any) -> None:
            failure.trap(defer.TimeoutError)
            log.warn(
                "shutdown timeout: closing {n} request(s) still in flight",
                n=len(self.site.in_flight),
            )
            for request in list(self.site.in_flight):
                transport = getattr(request.channel, "transport", None)
                if transport is not None:
                    transport.abortConnection()

        waiting.addErrback(give_up)
        return waiting


class DirectoryService(service.Service):
    def __init__(self, directory: Any) -> None:
        self.directory = directory

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        return defer.maybeDeferred(self.directory.close)


class ProxyService(service.MultiService):
    """The whole proxy. Children stop in reverse order: listeners, then drain, then directory."""

    def __init__(self, reactor: Any, options: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.listeners: list[ListenerService] = []
        self.redirect_listener: ListenerService | None = None
        self.tls_creator: tls.ReloadableServerCreator | None = None
        self.site: ProxySite | None = None
        self._previous_hup: Any = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.tls_creator is not None and hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return super().stopService()  # type: ignore[no-any-return]

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload_tls)

    def reload_tls(self) -> bool:
        assert self.tls_creator is not None
        return self.tls_creator.reload()

    def all_listening(self) -> defer.Deferred[list[Any]]:
        waits = [listener.listening for listener in self.listeners]
        if self.redirect_listener is not None:
            waits.append(self.redirect_listener.listening)
        return defer.gatherResults(waits, consumeErrors=True)


def build_service(options: Any, reactor: Any = None) -> ProxyService:
    """Assemble the proxy from parsed Options. Refuses bad TLS or database with UsageError."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    proxy = ProxyService(reactor, options)

    cert, key = options["tls-cert"], options["tls-key"]
    if not cert:
        cert, key = tls.ensure_self_signed(options["state-dir"], options["hostname"])
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

    try:
        directory = directory_module.open_directory(options["database"], reactor)
    except directory_module.DirectoryError as e:
        raise usage.UsageError(f"cannot open the directory: {e}") from None

    guard, guard_pages, guard_service = build_guard(
        directory,
        reactor,
        state_dir=options["state-dir"],
        session_lifetime_days=options["session-lifetime"],
        project_domain=options["project-domain"],
    )
    root = Root(
        guard=guard,
        forwarder=forward.Placeholder(),
        relay=relay.Placeholder(),
        raw=raw.Placeholder(),
        own_pages=OwnPages(directory, guard_pages),
        project_domain=options["project-domain"],
    )
    site = ProxySite(root, reactor=reactor)
    site.hsts_max_age = options["hsts-max-age"]
    proxy.site = site

    DirectoryService(directory).setServiceParent(proxy)
    guard_service.setServiceParent(proxy)
    DrainService(reactor, site, options["shutdown-timeout"]).setServiceParent(proxy)
    for description in options["listen"]:
        factory = TLSMemoryBIOFactory(creator, False, site)  # type: ignore[arg-type]
        listener = ListenerService(reactor, description, factory, "HTTPS")
        listener.setServiceParent(proxy)
        proxy.listeners.append(listener)
    if options["redirect-http"]:
        redirect_site = server.Site(
            RedirectResource(options["hostname"], _https_port(options)), reactor=reactor
        )
        redirect_site.displayTracebacks = False
        proxy.redirect_listener = ListenerService(
            reactor, options["redirect-http"], redirect_site, "HTTP redirect"
        )
        proxy.redirect_listener.setServiceParent(proxy)
    return proxy


def _https_port(options: Any) -> int | None:
    """The public HTTPS port for redirects: 443 is implied; the first tcp listener's otherwise."""
    for description in options["listen"]:
        parts = description.split(":")
        if parts[0] in ("tcp", "tcp6", "ssl") and len(parts) > 1:
            for part in parts[1:]:
                value = part.split("=", 1)[1] if part.startswith("port=") else part
                if value.isdigit():
                    port = int(value)
                    return None if port in (0, 443) else port
    return None
