"""PLACEHOLDER: answered 501 until its issue lands."""

from __future__ import annotations

from cocalcproxy import pages, routing
from cocalcproxy.site import Access, ProxyRequest


class Placeholder:
    def handle(self, request: ProxyRequest, route: routing.Route, access: Access) -> None:
        pages.write_error(
            request, 501, "Not implemented", "This part of the proxy is not built yet."
        )
