"""twistd plugin: ``twistd -n cocalcproxy``."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from cocalcproxy.options import Options


@implementer(IServiceMaker, IPlugin)
class CocalcProxyServiceMaker:
    tapname = "cocalcproxy"
    description = "HTTPS proxy to the web servers of a project, for its owner and collaborators."
    options = Options

    def makeService(self, options: Any) -> Any:  # noqa: N802
        from twisted.python.usage import UsageError

        from cocalcproxy.service import build_service

        try:
            proxy = build_service(options)
            proxy.exit_on_listen_failure = True
            return proxy
        except UsageError as e:
            # twistd would print a traceback; an operator needs one clear line and status 1.
            raise SystemExit(f"cocalcproxy: {e}") from None


serviceMaker = CocalcProxyServiceMaker()
