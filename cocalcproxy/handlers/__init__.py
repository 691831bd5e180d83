"""The handlers: what happens to a request the guard let through.

Owns ``forward`` (HTTP to the backend, streamed both ways), ``relay`` (a package: the WebSocket
handshake, frame boundaries, the splice), ``raw`` with ``rawfs``, ``rawhttp``, ``rawpath`` and
``rawlisting`` (files from the project's home, read-only), the backend policy (``backends``,
pure: which target a route may reach) and its Twisted side (``backendio``), and Unix-socket
backends (``socketdir``). Each handler gets a Route and an Access and never parses URLs or reads
credentials itself; the handlers know nothing of each other.

May import: ``http`` (the request, the Handler protocol, routing, headers, takeover),
``directory`` (the model, ports, addresses) and ``pages``. Never ``guard`` or ``ops``.
"""
