"""twisted.cred checkers over the directory, the realm, and the portal that joins them.

Each checker asks the directory and fires with an ``Identity`` (the avatar id) or fails with
``UnauthorizedLogin``. Avatar ids here are whole ``Identity`` records rather than bytes: the
directory already returned the account, so the realm has nothing left to look up. Directory
failures (database unreachable) propagate unchanged so the guard can answer 503, not 401.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from zope.interface import Attribute, Interface, implementer

from cocalcproxy.directory import Account, IDirectory
from cocalcproxy.guard.credentials import (
    MAX_NAME_LENGTH,
    MAX_SECRET_LENGTH,
    IAPIToken,
    INameAndSecret,
    ISessionToken,
    password_pair,
    well_formed_cookie_token,
)

Kind = Literal["session", "token", "password"]


@dataclass(frozen=True)
class Identity:
    """Who signed in, and how. ``expires_at`` is the credential's end when known (epoch seconds)."""

    account: Account
    kind: Kind
    expires_at: float | None = None


class IAccountAvatar(Interface):  # type: ignore[misc]
    identity = Attribute("The Identity that signed in.")


@implementer(IAccountAvatar)
@dataclass(frozen=True)
class SignedIn:
    identity: Identity


def _accept(account: Account | None, kind: Kind) -> Identity:
    if account is None:
        raise UnauthorizedLogin()
    return Identity(account, kind)


@implementer(ICredentialsChecker)
class SessionChecker:
    credentialInterfaces = (ISessionToken,)

    def __init__(self, directory: IDirectory) -> None:
        self.directory = directory

    def requestAvatarId(self, credentials: Any) -> Deferred[Identity]:  # noqa: N802
        token: str = credentials.token
        if not well_formed_cookie_token(token):
            return fail(UnauthorizedLogin())
        return self.directory.account_for_session(token).addCallback(_accept, "session")


@implementer(ICredentialsChecker)
class TokenChecker:
    credentialInterfaces = (IAPIToken,)

    def __init__(self, directory: IDirectory) -> None:
        self.directory = directory

    def requestAvatarId(self, credentials: Any) -> Deferred[Identity]:  # noqa: N802
        token: str = credentials.token
        if not token or len(token) > MAX_SECRET_LENGTH:
            return fail(UnauthorizedLogin())
        return self.directory.account_for_token(token).addCallback(_accept, "token")


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Name and password (the sign-in form). Argon2id runs in the directory's thread pool, which
    also verifies against a dummy hash for unknown names so timing does not reveal them.
    With ``enabled`` False (``--password-login off``) no password is ever accepted."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory: IDirectory, enabled: bool = True) -> None:
        self.directory = directory
        self.enabled = enabled

    def requestAvatarId(self, credentials: Any) -> Deferred[Identity]:  # noqa: N802
        pair = password_pair(credentials)
        if not self.enabled or pair is None or not _plausible(*pair):
            return fail(UnauthorizedLogin())
        return self.directory.check_password(*pair).addCallback(_accept, "password")


@implementer(ICredentialsChecker)
class NameAndSecretChecker:
    """Basic credentials: the secret is an API token of the named account, or (unless
    ``passwords`` is False, ``--password-login off``) its password."""

    credentialInterfaces = (INameAndSecret,)

    def __init__(self, directory: IDirectory, passwords: bool = True) -> None:
        self.directory = directory
        self.passwords = passwords

    @inlineCallbacks
    def requestAvatarId(self, credentials: Any):  # type: ignore[no-untyped-def]  # noqa: N802
        name: str = credentials.name
        secret: str = credentials.secret
        if not _plausible(name, secret):
            raise UnauthorizedLogin()
        account: Account | None = yield self.directory.account_for_token(secret)
        if account is not None and account.name == name:
            return Identity(account, "token")
        if not self.passwords:
            raise UnauthorizedLogin()
        account = yield self.directory.check_password(name, secret)
        return _accept(account, "password")


def _plausible(name: str, secret: str) -> bool:
    return 0 < len(name) <= MAX_NAME_LENGTH and 0 < len(secret) <= MAX_SECRET_LENGTH


@implementer(IRealm)
class AccountRealm:
    def requestAvatar(  # noqa: N802
        self,
        avatarId: Any,
        mind: object,
        *interfaces: Any,  # noqa: N803
    ) -> tuple[Any, object, Any]:
        if IAccountAvatar in interfaces and isinstance(avatarId, Identity):
            return IAccountAvatar, SignedIn(avatarId), lambda: None
        raise NotImplementedError("cocalcproxy only offers IAccountAvatar")


def make_portal(directory: IDirectory, password_login: bool = True) -> Portal:
    checkers = [
        SessionChecker(directory),
        TokenChecker(directory),
        PasswordChecker(directory, password_login),
        NameAndSecretChecker(directory, password_login),
    ]
    return Portal(cast(IRealm, AccountRealm()), cast(list[ICredentialsChecker], checkers))


def identity_of(login_result: tuple[Any, object, Any]) -> Identity:
    _interface, avatar, _logout = login_result
    assert isinstance(avatar, SignedIn)
    return avatar.identity
