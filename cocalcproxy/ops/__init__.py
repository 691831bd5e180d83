"""Operations: the proxy as a running service, and everything an operator touches.

Owns ``service`` (builds and wires every room into one Twisted service: the only place that
knows them all), ``options`` (the ``twistd cocalcproxy`` command line), ``workers`` (the
``--workers N`` supervisor), ``tls``, ``systemd`` (socket activation, notify), ``metrics``,
``accesslog``, and the administration faces: ``admin`` (the ``cocalcproxy`` command),
``adminapi`` (the admin HTTP API) and ``openapi`` (its description).

May import every other room. Nothing imports ``ops`` except the twistd plugin and the
``cocalcproxy`` console script; a lower room that needs something from here names it as a
Protocol in its own room (``guard.GuardMetrics``) and ``service`` passes the real thing in.
"""
