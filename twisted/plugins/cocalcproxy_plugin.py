"""twistd plugin: ``twistd -n cocalcproxy``."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from cocalcproxy.ops.options import CommandLineOptions


@implementer(IServiceMaker, IPlugin)
class CocalcProxyServiceMaker:
    tapname = "cocalcproxy"
    description = "HTTPS proxy to the web servers of a project, for its owner and collaborators."
    options = CommandLineOptions

    def makeService(self, options: Any) -> Any:  # noqa: N802
        import os

        from twisted.python.usage import UsageError

        from cocalcproxy.ops.service import build_service
        from cocalcproxy.ops.workers import ENV, build_supervisor

        try:
            if options["workers"] > 1 and not os.environ.get(ENV):
                return build_supervisor(options)
            proxy = build_service(options)
            proxy.exit_on_listen_failure = True
            proxy.settle_gc_when_listening = True
            proxy.own_event_dispatch = True
            if proxy.worker_link is not None:
                # Under twistd the listeners may listen before the reactor runs: "ready" only
                # once this worker's SIGTERM handler is in place.
                proxy.worker_link.await_handlers = True
                # Before twistd begins logging, so its observer sees the worker's number.
                from cocalcproxy.ops.workers import tag_log_lines

                tag_log_lines(proxy.worker_link.spec.index)
            return proxy
        except UsageError as e:
            # twistd would print a traceback; an operator needs one clear line and status 1.
            raise SystemExit(f"cocalcproxy: {e}") from None
        except OSError as e:
            # A file the configuration names that cannot be read or written (the specific checks
            # in build_service name the option; this is the net under them).
            raise SystemExit(f"cocalcproxy: cannot start: {e}") from None


serviceMaker = CocalcProxyServiceMaker()
