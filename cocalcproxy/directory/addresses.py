"""Pure facts about backend host names and addresses. No Twisted imports, no I/O.

Whether an address is one of *this machine's* other addresses (a LAN address) needs the
operating system; that test lives with the Twisted glue (handlers.backendio.is_local_address)
and is passed into the pure policy as a function.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ip_of and always_local run for every proxied request (the backend's address is screened
# before each connection), and parsing an address with ipaddress costs more than the rest of
# the screening; the addresses seen are few (projects' hosts and what they resolve to), so the
# answers are cached. Both are pure and their results immutable.


@lru_cache(maxsize=4096)
def ip_of(host: str) -> IPAddress | None:
    """The IP address a host literal names (brackets and a zone allowed), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def unmapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d) or IPv4-compatible (::a.b.c.d)
    IPv6 address; other addresses unchanged."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if int(ip) >> 32 == 0 and int(ip) > 1:
            return ipaddress.IPv4Address(int(ip))
    return ip


def same_ip(a: str, b: str) -> bool:
    x, y = ip_of(a), ip_of(b)
    return x is not None and y is not None and unmapped(x) == unmapped(y)


def is_loopback_name(host: str) -> bool:
    """``localhost`` and names under ``.localhost`` (RFC 6761: they resolve to loopback)."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


@lru_cache(maxsize=4096)
def always_local(host: str) -> bool:
    """Hosts that reach this machine whatever its interfaces: loopback (127.0.0.0/8, ::1), the
    unspecified addresses (connecting to 0.0.0.0 or :: reaches this machine on Linux),
    0.0.0.0/8, their IPv4-mapped forms, and the localhost names."""
    if is_loopback_name(host):
        return True
    ip = ip_of(host)
    if ip is None:
        return False
    ip = unmapped(ip)
    if ip.is_loopback or ip.is_unspecified:
        return True
    return isinstance(ip, ipaddress.IPv4Address) and int(ip) >> 24 == 0
