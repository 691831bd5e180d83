"""Plain records and errors shared by every directory implementation and its callers."""

from __future__ import annotations

from dataclasses import dataclass, field

from cocalcproxy.directory.ports import PortSet


@dataclass(frozen=True)
class Account:
    """An account. ``email`` is known for accounts that signed in with the OpenID provider
    (its verified address, kept fresh at each sign-in); ``oidc_subject`` is the provider's
    ``sub`` the account is bound to (None: not bound). Both are left out of equality so an
    Account read with or without them compares the same."""

    id: int
    name: str
    email: str | None = field(default=None, compare=False)
    oidc_subject: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Project:
    id: str
    owner_id: int
    owner_name: str
    host: str
    home: str | None
    title: str
    collaborators: tuple[str, ...] = field(default=())
    #: The ports the project's routes may reach; None: the operator's --default-ports.
    ports: PortSet | None = None
    #: Serve ``/<pid>/server/<port>/`` from the Unix socket ``<socket_dir>/<port>`` instead of TCP.
    socket_dir: str | None = None
    #: The uid that must own the socket folder's sockets; None: the folder's owner.
    socket_owner: int | None = None
    #: Another project has the same host (computed by the directory, not stored).
    shares_host: bool = False
    #: How many other projects the directory holds (computed, not stored). A project on this
    #: machine is alone only when there are none: another project's host may name this
    #: machine in a spelling the proxy cannot match (a LAN address, a name that resolves here).
    other_projects: int = 0


@dataclass(frozen=True)
class TokenInfo:
    """Public facts about an API token; the secret itself is never stored."""

    id: str
    account_name: str
    created: float
    expires: float | None


@dataclass(frozen=True)
class AdminTokenInfo:
    """Public facts about an admin API token; only the SHA-256 of the secret is stored."""

    id: str
    description: str
    created: float
    expires: float | None


@dataclass(frozen=True)
class Share:
    """A port of a project shared beyond its members: ``link`` (with a secret whose SHA-256 is
    ``secret_hash``) or ``public``. A port without a Share is private (members only)."""

    project_id: str
    port: int
    visibility: str
    created: float
    expires: float | None
    secret_hash: str | None = field(default=None, repr=False)

    def live(self, now: float) -> bool:
        return self.expires is None or self.expires > now


class DirectoryError(Exception):
    """A refusal whose message is safe to show to the person who asked (admin command, logs)."""


class NotFound(DirectoryError):
    pass


class Conflict(DirectoryError):
    pass


class InvalidInput(DirectoryError):
    pass


class Unavailable(DirectoryError):
    """The database cannot be reached or read."""


class Gone(Unavailable):
    """The database this process opened is no longer at its address (a SQLite file deleted or
    replaced): not an outage that ends by itself, and a split if used on."""
