"""The twistd options of ``twistd cocalcproxy``: one source of truth for names and defaults."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.python import usage

from cocalcproxy.directory.ports import PortSet, parse_ports
from cocalcproxy.handlers.backends import DEFAULT_DENY_PORTS
from cocalcproxy.http.site import MIN_BODY_RATE, REQUEST_HEAD_TIMEOUT

DEFAULT_LISTEN = "tcp:8443"


def default_state_dir(environ: dict[str, str] | None = None) -> str:
    """The state directory.

    ``$COCALCPROXY_STATE_DIR``, else systemd's ``$STATE_DIRECTORY``, else ``cocalcproxy-state``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("COCALCPROXY_STATE_DIR")
    if explicit:
        return explicit
    systemd = env.get("STATE_DIRECTORY")
    if systemd:
        # systemd may pass several colon-separated directories; the first is ours.
        return systemd.split(":")[0]
    return "cocalcproxy-state"


def default_database_url(state_dir: str) -> str:
    return "sqlite:///" + str(Path(state_dir).absolute() / "directory.sqlite3")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("not a whole number") from None
    if number <= 0:
        raise ValueError("must be a positive whole number")
    return number


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("not a whole number") from None
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise ValueError(f"expected on or off, not {value!r}")
    return value == "on"


def _positive_float(value: str) -> float:
    """A duration or other positive quantity: finite and above zero (``inf``, ``nan`` and
    negative values are refused: an infinite timeout is a resource leak, not a setting)."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


_positive_float.coerceDoc = "A positive, finite number."  # type: ignore[attr-defined]


def _non_negative_float(value: str) -> float:
    """A duration where 0 means "none": finite and not negative."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _size(value: str) -> int:
    """A byte count with an optional K/M/G/T suffix (powers of 1024)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    for suffix, power in (("K", 1), ("M", 2), ("G", 3), ("T", 4)):
        if text.endswith(suffix):
            factor = 1024**power
            text = text[:-1]
            break
    if not text.isdigit():
        raise ValueError("not a size (a whole number of bytes, optionally with K, M, G or T)")
    number = int(text) * factor
    if number <= 0:
        raise ValueError("must be a positive size")
    return number


class _NamedCoerce(usage.CoerceParameter):
    """Twisted's coercion, with an error that names the option and the value
    (Twisted says only "Parameter type enforcement failed")."""

    def dispatch(self, parameterName: str, value: str | None) -> None:  # noqa: N802, N803
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            coerced = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName} {value!r}: {e}") from None
        self.options.opts[parameterName] = coerced


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset and systemd's
    CPUAffinity= narrow), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


MAX_WORKERS = 256


def _workers(value: str) -> int:
    """``auto`` (one per usable CPU) or a whole number from 1."""
    if value.strip().lower() == "auto":
        return usable_cpus()
    number = _positive_int(value)
    if number > MAX_WORKERS:
        raise ValueError(f"at most {MAX_WORKERS}")
    return number


_workers.coerceDoc = "A whole number from 1, or auto."  # type: ignore[attr-defined]


def _default_ports(value: str) -> PortSet | None:
    """``auto`` (None) or a port list."""
    if value.strip().lower() == "auto":
        return None
    return parse_ports(value)


class Options(usage.Options):
    """Run the cocalcproxy HTTPS proxy.

    Every request for /<project_id>/server/<port>/, /<project_id>/port/<port>/ or
    /<project_id>/raw/ is let through only for the project's owner and collaborators.
    """

    synopsis = "[options]"
    longdesc = __doc__

    optFlags: list[list[Any]] = [
        [
            "identity-assertion",
            None,
            "Send every proxied request and WebSocket handshake a signed X-Cocalcproxy-Identity "
            "JWT (ES256, 60 s) saying who is calling; public keys at /_/jwks.json.",
        ],
    ]

    optParameters: list[list[Any]] = [
        [
            "state-dir",
            None,
            None,
            "Directory for the SQLite database, generated TLS material and secrets "
            "[default: $COCALCPROXY_STATE_DIR, else $STATE_DIRECTORY, else ./cocalcproxy-state].",
        ],
        [
            "database",
            None,
            None,
            "Directory database URL: sqlite:///PATH or postgresql://user@host/db "
            "[default: sqlite:///<state-dir>/directory.sqlite3].",
        ],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate (leaf first, then the chain; may also hold the key). Re-read on "
            "SIGHUP. [default: a self-signed certificate generated under <state-dir>/tls/]",
        ],
        ["tls-key", None, None, "PEM private key [default: the key inside --tls-cert]."],
        [
            "redirect-http",
            None,
            None,
            "Plain-HTTP endpoint that redirects every request to https (308) and proxies nothing.",
        ],
        ["hostname", None, "localhost", "Public host name used in redirects and the certificate."],
        [
            "project-domain",
            None,
            None,
            "Serve https://<pid>-<port>.DOMAIN/ and https://<pid>-raw.DOMAIN/ (subdomain routing).",
        ],
        ["metrics", None, None, "Plain-HTTP endpoint for Prometheus /metrics (bind to loopback)."],
        [
            "workers",
            None,
            "1",
            "Worker processes serving the listeners: a number, or auto for one per usable CPU. "
            "Above 1, a supervising process binds every listener, hands it to the workers, "
            "restarts a worker that dies and sums their metrics. 1 is one process as before.",
            _workers,
        ],
        [
            "admin-api",
            None,
            None,
            "Endpoint for the JSON admin API (Authorization: Bearer <admin token>, made with "
            "'cocalcproxy admin-token create'; refuses to start while none exists). TLS on top "
            "unless it is a Unix socket or loopback TCP. [default: off]",
        ],
        [
            "allow-sharing",
            None,
            "link",
            "What members may share beyond the project: none, link (secret links) or public "
            "(also anyone). Shared ports are served only on --project-domain subdomains.",
        ],
        [
            "access-log",
            None,
            "-",
            "Where the JSON access log goes: - (standard output, for journald), a file path "
            "(reopened on SIGHUP), or off.",
        ],
        [
            "max-body-size",
            None,
            1024**3,
            "Largest request body forwarded, bytes with optional K/M/G suffix; larger gets 413.",
            _size,
        ],
        [
            "backend-connect-timeout",
            None,
            10.0,
            "Seconds to wait for a backend to accept a connection before answering 504.",
            _positive_float,
        ],
        [
            "backend-response-timeout",
            None,
            300.0,
            "Seconds to wait for a backend's response headers before answering 504.",
            _positive_float,
        ],
        [
            "session-lifetime",
            None,
            14.0,
            "Days a sign-in session lasts.",
            _positive_float,
        ],
        [
            "hsts-max-age",
            None,
            31536000,
            "Strict-Transport-Security max-age in seconds on every HTTPS answer (0 turns it off).",
            _non_negative_int,
        ],
        [
            "request-head-timeout",
            None,
            REQUEST_HEAD_TIMEOUT,
            "Seconds a client has to send a whole request head (from its first byte; for a new "
            "connection, from its start); a request body gets as long again, plus 1 second per "
            f"{MIN_BODY_RATE:g} bytes. Slower clients get 408 and are disconnected.",
            _positive_float,
        ],
        [
            "websocket-idle-timeout",
            None,
            3600.0,
            "Seconds without traffic in either direction before a WebSocket relay is closed "
            "(checked every sixtieth of that, 1 s to 60 s).",
            _positive_float,
        ],
        [
            "shutdown-timeout",
            None,
            30.0,
            "On SIGTERM, seconds to let requests in flight finish before closing them.",
            _positive_float,
        ],
        [
            "directory-grace",
            None,
            300.0,
            "While the directory is unreachable, seconds to go on using the decisions it gave "
            "before (revocations cannot arrive meanwhile); 0 refuses everything at once.",
            _non_negative_float,
        ],
        [
            "absolute-url-redirect",
            None,
            "on",
            "on: a main-host request that matches nothing and whose same-origin Referer lies "
            "under /<pid>/server/<port>/ is redirected (307) into that prefix; off: a 404 that "
            "explains the absolute URL.",
            _on_off,
        ],
        [
            "oidc-issuer",
            None,
            None,
            "Sign in with this OpenID Connect provider (its issuer URL, https; http only on "
            "loopback). Needs --oidc-client-id and --oidc-client-secret-file.",
        ],
        ["oidc-client-id", None, None, "The proxy's client id at the OpenID provider."],
        [
            "oidc-client-secret-file",
            None,
            None,
            "File holding the client secret (never the secret itself on the command line).",
        ],
        [
            "oidc-name",
            None,
            None,
            "The provider's name on the button \"Sign in with NAME\" [default: the issuer's "
            "host name].",
        ],
        [
            "oidc-username-claim",
            None,
            "preferred_username",
            "ID token claim that names a new account; when it is missing or not a valid name, "
            "the verified email is used.",
        ],
        [
            "oidc-allowed-domains",
            None,
            None,
            "Comma-separated e-mail domains: only people whose verified e-mail address is in "
            "one of them may sign in with the provider [default: anyone the provider signs in].",
        ],
        [
            "password-login",
            None,
            "on",
            "on or off: the password form and Basic with a password (API tokens always work).",
        ],
        [
            "backend-pool-size",
            None,
            64,
            "Idle persistent connections kept per backend host and port, at least (more while more "
            "were busy at once; each closed after 60 s idle).",
            _positive_int,
        ],
        [
            "default-ports",
            None,
            "auto",
            "Ports a project without its own --ports may reach: a list such as 8000-8099,8888, "
            "none, all, or auto (1024-65535 for a project alone on its host, none for a project "
            "that may share it: the same host, or this machine while other projects exist; "
            "see docs/security.rst).",
            _default_ports,
        ],
        [
            "deny-ports",
            None,
            DEFAULT_DENY_PORTS,
            "Ports no project route ever reaches over TCP, whatever its port set (none to deny "
            "nothing). The default lists well-known infrastructure: SSH, mail, DNS, NFS, SMB, "
            "databases, caches, message brokers, Docker, etcd, Kubernetes, Consul, Vault.",
            parse_ports,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        for name, handler in list(self._dispatch.items()):
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoerce(self, handler.coerce)

    def opt_listen(self, endpoint: str) -> None:
        """Twisted server endpoint to serve HTTPS on; repeatable; TLS is applied on top
        (tcp:8443, tcp6:port=443:interface=\\:\\:, unix:/run/cocalcproxy.sock,
        systemd:domain=INET:index=0) [default: tcp:8443]."""
        self["listen"].append(endpoint)

    def _oidc_options(self) -> None:
        """Check the OpenID options together; ``self["oidc"]`` is their OIDCSettings or None.
        The secret file is read when the service is built (``OIDCSettings.with_secret``).
        ``guard.oidc`` (treq, joserfc) is imported only when OpenID is configured: a proxy
        without it does not carry them in memory."""
        if self["password-login"] not in ("on", "off"):
            raise usage.UsageError("--password-login must be on or off")
        given = [
            name
            for name in ("oidc-issuer", "oidc-client-id", "oidc-client-secret-file")
            if self[name]
        ]
        self["oidc"] = None
        if not given:
            for name in ("oidc-name", "oidc-allowed-domains"):
                if self[name]:
                    raise usage.UsageError(f"--{name} needs --oidc-issuer")
            return
        if len(given) != 3:
            raise usage.UsageError(
                "--oidc-issuer, --oidc-client-id and --oidc-client-secret-file go together"
            )
        from cocalcproxy.guard.oidc import OIDCSettings, check_issuer_option

        try:
            issuer = check_issuer_option(self["oidc-issuer"])
        except ValueError as e:
            raise usage.UsageError(f"--oidc-issuer {e}") from None
        domains: tuple[str, ...] = ()
        if self["oidc-allowed-domains"]:
            domains = tuple(
                d.strip().lower().lstrip("@") for d in self["oidc-allowed-domains"].split(",")
            )
            if not all(d and "." in d and " " not in d for d in domains):
                raise usage.UsageError("--oidc-allowed-domains must be domains separated by ','")
        claim = self["oidc-username-claim"]
        if not claim or len(claim) > 100:
            raise usage.UsageError("--oidc-username-claim must name a claim")
        name = self["oidc-name"] or (urlsplit(issuer).hostname or issuer)
        self["oidc"] = OIDCSettings(
            issuer=issuer,
            client_id=self["oidc-client-id"],
            client_secret_file=self["oidc-client-secret-file"],
            name=name[:100],
            username_claim=claim,
            allowed_domains=domains,
        )

    def postOptions(self) -> None:
        if isinstance(self["absolute-url-redirect"], str):  # the default is not coerced
            self["absolute-url-redirect"] = _on_off(self["absolute-url-redirect"])
        if isinstance(self["workers"], str):
            self["workers"] = _workers(self["workers"])
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["state-dir"] is None:
            self["state-dir"] = default_state_dir()
        if self["database"] is None:
            self["database"] = default_database_url(self["state-dir"])
        # Defaults are not passed through the coercers: make them the same types as given values.
        if isinstance(self["default-ports"], str):
            self["default-ports"] = _default_ports(self["default-ports"])
        if isinstance(self["deny-ports"], str):
            self["deny-ports"] = parse_ports(self["deny-ports"])
        if self["tls-key"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-key needs --tls-cert")
        self._oidc_options()
        if self["allow-sharing"] not in ("none", "link", "public"):
            raise usage.UsageError("--allow-sharing must be none, link or public")
        if self["project-domain"] is not None:
            domain = self["project-domain"].strip(".").lower()
            # Letters, digits and hyphens only: the name ends up in URLs, a Content-Security-Policy
            # (the sign-in hop) and cookie tags, so nothing that could break out of those.
            labels = domain.split(".")
            if not domain or not all(
                0 < len(label) <= 63
                and label.isascii()
                and all(c.isalnum() or c == "-" for c in label)
                and not label.startswith("-")
                and not label.endswith("-")
                for label in labels
            ):
                raise usage.UsageError("--project-domain must be a DNS name")
            self["project-domain"] = domain


class CommandLineOptions(Options):
    """The options as twistd's plugin sees them: a refusal is one line on stderr and status 1.

    twistd itself would print the whole usage text above the error (for a mistake in one
    option); ``--help`` still prints it.
    """

    # The arguments as given, which a supervisor hands on to its worker processes.
    argv: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"cocalcproxy: {e}") from None
