"""The front door: HTTP/1.1 in, a request routed, and its body held until the guard decides.

Owns the request and the site (``site``: ProxyRequest, Root, ProxyChannel, ProxySite, Access,
and the Guard/Handler/OwnPages protocols the other rooms implement), the pure rules every room
shares (``routing``: host and path to a Route; ``headers``: what goes to a backend and back;
``headlimit``; ``prebody``: the plan for a request that announces a body), the fast lane
that answers the common proxied request without Twisted's HTTP server (``lane``), the connection
takeover a WebSocket relay needs (``takeover``), the Server-header-free request
(``bannerless``), the redirect listener (``redirect``) and the proxy's own pages under ``/_/``
(``ownpages``).

May import: ``directory`` (Account, Project, Unavailable) and ``pages``. Never ``guard``,
``handlers`` or ``ops``: those plug into the protocols defined here, and ``ops.service`` wires
them together. Inside: ``site`` imports ``prebody``, never the reverse; ``lane`` imports
``site``, which builds a lane only where it is enabled (a deferred import).
"""
