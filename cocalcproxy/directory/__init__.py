"""The directory: accounts, projects, collaborators, sessions, API tokens and a change counter.

Two faces over one implementation:

* ``SyncDirectory``: blocking calls, used by the admin command and run inside worker threads.
* ``Directory``: the same method names returning Deferreds; every call runs the blocking
  implementation in a thread pool so the reactor thread never touches the database or Argon2.

Every write bumps the change counter; running proxies poll ``change_counter()`` to drop cached
decisions.

The room also owns the facts it stores and validates, pure: ``ports`` (port lists), ``addresses``
(host names and addresses), ``validate``, ``hashing``; and ``operations``, the one
implementation of each administrative operation that the ``cocalcproxy`` command and the admin
API both call.

May import: nothing of the other rooms (it is the bottom of the house).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

from cocalcproxy.directory.model import (
    Account,
    Conflict,
    DirectoryError,
    InvalidInput,
    NotFound,
    Project,
    Share,
    TokenInfo,
    Unavailable,
)

T = TypeVar("T")

__all__ = [
    "Account",
    "Conflict",
    "DirectoryError",
    "IDirectory",
    "InvalidInput",
    "NotFound",
    "Project",
    "TokenInfo",
    "Unavailable",
]


class IDirectory(Protocol):
    """What the proxy needs from the directory. Every method returns a Deferred."""

    def ping(self) -> Deferred[None]: ...

    def change_counter(self) -> Deferred[int]: ...

    def close(self) -> Deferred[None]: ...

    # accounts
    def add_user(
        self,
        name: str,
        password: str | None,
        oidc_subject: str | None = None,
        email: str | None = None,
    ) -> Deferred[Account]: ...

    # OpenID Connect: binding accounts to the provider's subject, and the sign-in policy
    def link_oidc_subject(self, name: str, subject: str | None) -> Deferred[Account]: ...

    def account_for_oidc_subject(self, subject: str) -> Deferred[Account | None]: ...

    def oidc_sign_in(self, subject: str, username: str, email: str | None) -> Deferred[Account]: ...

    # identity assertion keys: (kid, private JWK as JSON, created) triples
    def identity_keys(self) -> Deferred[list[tuple[str, str, float]]]: ...

    def rotate_identity_keys(
        self, rotate_after: float, keep_for: float, make_key: Callable[[], tuple[str, str]]
    ) -> Deferred[list[tuple[str, str, float]]]: ...

    def set_password(self, name: str, password: str) -> Deferred[None]: ...

    def remove_user(self, name: str) -> Deferred[None]: ...

    def list_users(self) -> Deferred[list[Account]]: ...

    def check_password(self, name: str, password: str) -> Deferred[Account | None]: ...

    # API tokens: create returns (token_id, secret token); only the SHA-256 of the secret is kept
    def create_token(
        self, name: str, expires_in_days: float | None = None
    ) -> Deferred[tuple[str, str]]: ...

    def revoke_token(self, token_id: str) -> Deferred[None]: ...

    def account_for_token(self, token: str) -> Deferred[Account | None]: ...

    # sessions: create returns the secret session token (the cookie value); with ``parent`` the
    # session is derived from that one (same family) and ends when the family's root ends
    def create_session(
        self, account_id: int, lifetime_seconds: float, parent: str | None = None
    ) -> Deferred[str]: ...

    def account_for_session(self, token: str) -> Deferred[Account | None]: ...

    def delete_session(self, token: str) -> Deferred[None]: ...

    # failed password sign-ins, counted for every process on the directory (guard/ratelimit.py)
    def signin_attempt(
        self, checks: Sequence[tuple[str, int, float]]
    ) -> Deferred[tuple[float | None, float]]: ...

    def signin_forgive(self, key: str, at: float) -> Deferred[None]: ...

    def signin_reset(self, key: str) -> Deferred[None]: ...

    # state shared by every process on the directory: a secret made once by whoever asks first,
    # and values (hop tickets, OpenID states) that may be used only once across all processes
    def shared_secret(self, name: str, make: Callable[[], str]) -> Deferred[str]: ...

    def use_once(self, purpose: str, value: str, expires: float) -> Deferred[bool]: ...

    # projects
    def add_project(
        self,
        owner: str,
        host: str = "127.0.0.1",
        home: str | None = None,
        project_id: str | None = None,
        title: str = "",
        ports: str | None = None,
        socket_dir: str | None = None,
        socket_owner: int | str | None = None,
    ) -> Deferred[Project]: ...

    def set_project(
        self,
        project_id: str,
        host: str | None = None,
        home: str | None = None,
        title: str | None = None,
        ports: str | None = None,
        socket_dir: str | None = None,
        socket_owner: int | str | None = None,
    ) -> Deferred[Project]: ...

    def remove_project(self, project_id: str) -> Deferred[None]: ...

    def add_collaborator(self, project_id: str, name: str) -> Deferred[None]: ...

    def remove_collaborator(self, project_id: str, name: str) -> Deferred[None]: ...

    def get_project(self, project_id: str) -> Deferred[Project | None]: ...

    def list_projects(self) -> Deferred[list[Project]]: ...

    def project_for(self, account_id: int, project_id: str) -> Deferred[Project | None]:
        """The project, only when the account is its owner or a collaborator; else None."""
        ...

    def projects_for(self, account_id: int) -> Deferred[list[Project]]: ...

    def share_for(self, project_id: str, port: int) -> Deferred[tuple[Share, Project] | None]:
        """A shared port with its project, or None when the port is private."""
        ...

    def list_shares(self, project_id: str | None = None) -> Deferred[list[Share]]: ...

    def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """``work(sync_directory, *args, **kwargs)`` in the directory's threads."""
        ...


if TYPE_CHECKING:
    from cocalcproxy.directory.store import Directory


def open_directory(url: str, reactor: object) -> Directory:
    """Open (and migrate) the directory at ``url``: an ``IDirectory`` that also offers
    ``change_listener`` (the proxy's service wires it to the guard)."""
    from cocalcproxy.directory.store import open_directory as _open

    return _open(url, reactor)
