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
        from cocalcproxy.service import build_service

        return build_service(options)


serviceMaker = CocalcProxyServiceMaker()
