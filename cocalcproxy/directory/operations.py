"""Every administrative operation, once: the ``cocalcproxy`` command and the admin API call these.

Each operation takes a ``SyncDirectory`` (blocking; the API runs it in the directory's thread
pool) and plain arguments, applies the rules that are not the database's (a ``project set`` with
nothing to change, the sharing policy), and returns what both faces show: a JSON-ready value.
The command prints it (``--json``) or a few lines from it; the API sends it. The directory
validates every name, id, host and path, so a value the command refuses is refused by the API
with the same message.

Every write goes through the directory, which bumps its change counter in the same transaction:
running proxies see a change made here within their polling interval, whoever made it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cocalcproxy.directory import validate
from cocalcproxy.directory.addresses import always_local
from cocalcproxy.directory.hashing import generated_password
from cocalcproxy.directory.model import (
    Account,
    AdminTokenInfo,
    DirectoryError,
    InvalidInput,
    NotFound,
    Project,
    Share,
    TokenInfo,
)
from cocalcproxy.directory.store import SyncDirectory

#: What ``--allow-sharing`` may say, from most to least restrictive.
SHARING_LEVELS = ("none", "link", "public")
DEFAULT_ALLOW_SHARING = "link"
#: The path on a project subdomain where a link share's secret is presented (once).
SHARE_LANDING = "/.cocalcproxy/share"
#: Its query parameter.
SHARE_SECRET_PARAMETER = "s"  # noqa: S105 - a parameter name, not a secret

Json = dict[str, Any]


class Forbidden(DirectoryError):
    """The operator's policy does not allow this (sharing without --project-domain, a
    visibility beyond --allow-sharing)."""


@dataclass(frozen=True)
class SharingPolicy:
    """What members may share on this proxy, and where shared ports are served.

    ``project_domain`` None means the proxy has no project subdomains: shared ports are served
    only there (never on the main host, whose origin holds members' sessions), so nothing can be
    shared. ``None`` for the whole policy (the command line, which does not know the running
    proxy's options) applies no policy here: a proxy serves a share only when its own policy
    allows it (``allows``)."""

    allow: str = DEFAULT_ALLOW_SHARING
    project_domain: str | None = None

    def allows(self, visibility: str) -> bool:
        if visibility == "private":
            return True
        if self.project_domain is None:
            return False
        return SHARING_LEVELS.index(self.allow) >= SHARING_LEVELS.index(visibility)

    def check(self, visibility: str) -> None:
        if visibility == "private":
            return
        if self.project_domain is None:
            raise Forbidden(
                "sharing needs project subdomains: a shared port is served only on "
                "https://<project id>-<port>.<project domain>/, never on the main host (whose "
                "origin holds members' sign-in sessions); start the proxy with --project-domain"
            )
        if not self.allows(visibility):
            raise Forbidden(
                f"the operator does not allow {visibility!r} sharing on this proxy "
                f"(--allow-sharing {self.allow})"
            )

    def host(self, project_id: str, port: int) -> str | None:
        if self.project_domain is None:
            return None
        return f"{project_id}-{port}.{self.project_domain}"


# -- JSON shapes ---------------------------------------------------------------------------------


def user_json(account: Account) -> Json:
    doc: Json = {"id": account.id, "name": account.name}
    if account.oidc_subject is not None:
        doc["oidc_subject"] = account.oidc_subject
    if account.email is not None:
        doc["email"] = account.email
    return doc


def token_json(info: TokenInfo) -> Json:
    return {
        "id": info.id,
        "user": info.account_name,
        "created": info.created,
        "expires": info.expires,
    }


def admin_token_json(info: AdminTokenInfo) -> Json:
    return {
        "id": info.id,
        "description": info.description,
        "created": info.created,
        "expires": info.expires,
    }


def project_json(project: Project) -> Json:
    return {
        "id": project.id,
        "owner": project.owner_name,
        "host": project.host,
        "home": project.home,
        "title": project.title,
        "collaborators": list(project.collaborators),
        "ports": None if project.ports is None else str(project.ports),
        "socket_dir": project.socket_dir,
        "socket_owner": project.socket_owner,
    }


def share_json(share: Share, policy: SharingPolicy | None, secret: str | None = None) -> Json:
    doc: Json = {
        "project": share.project_id,
        "port": share.port,
        "visibility": share.visibility,
        "created": share.created,
        "expires": share.expires,
    }
    host = policy.host(share.project_id, share.port) if policy is not None else None
    if host is not None:
        doc["url"] = f"https://{host}/"
    if secret is not None:
        doc["secret"] = secret
        landing = f"{SHARE_LANDING}?{SHARE_SECRET_PARAMETER}={secret}"
        doc["link"] = f"https://{host}{landing}" if host is not None else landing
    return doc


@dataclass(frozen=True)
class Page:
    """One page of a listing: the items and the cursor for the next page (None at the end)."""

    items: list[Json]
    next_cursor: str | None

    def json(self) -> Json:
        return {"items": self.items, "next_cursor": self.next_cursor}


def _page(items: list[Json], limit: int | None, cursor_of: Any) -> Page:
    more = limit is not None and len(items) == limit
    return Page(items, cursor_of(items[-1]) if more and items else None)


# -- users ---------------------------------------------------------------------------------------


def user_add(
    d: SyncDirectory, name: str, password: str | None = None, oidc_subject: str | None = None
) -> Json:
    """Create an account. Without a password and without an OpenID subject a password is
    generated and returned (shown once); with a subject and no password the account signs in
    only with the provider."""
    generated = password is None and oidc_subject is None
    secret = generated_password() if generated else password
    doc = user_json(d.add_user(name, secret, oidc_subject=oidc_subject))
    if generated:
        doc["password"] = secret
    return doc


def user_link(d: SyncDirectory, name: str, oidc_subject: str | None) -> Json:
    """Bind the account to a provider subject, or (None) unbind it; ends its sessions."""
    return user_json(d.link_oidc_subject(name, oidc_subject))


def user_passwd(d: SyncDirectory, name: str, password: str) -> Json:
    d.set_password(name, password)
    return {"name": name}


def user_remove(d: SyncDirectory, name: str) -> Json:
    d.remove_user(name)
    return {"removed": name}


def user_get(d: SyncDirectory, name: str) -> Json:
    validate.name(name)
    account = d.get_user(name)
    if account is None:
        raise NotFound(f"no user named {name!r}")
    return user_json(account)


def user_list(d: SyncDirectory, cursor: str | None = None, limit: int | None = None) -> Page:
    if cursor is not None and not validate.is_name(cursor):
        raise InvalidInput("invalid cursor: pass back the next_cursor of the previous page")
    items = [user_json(a) for a in d.list_users(after=cursor, limit=limit)]
    return _page(items, limit, lambda last: last["name"])


# -- API tokens ----------------------------------------------------------------------------------


def token_create(d: SyncDirectory, name: str, expires_in_days: float | None = None) -> Json:
    token_id, token = d.create_token(name, expires_in_days)
    info = next(t for t in d.list_tokens(name) if t.id == token_id)
    return {**token_json(info), "token": token}


def token_revoke(d: SyncDirectory, token_id: str) -> Json:
    d.revoke_token(token_id)
    return {"revoked": token_id}


def token_list(
    d: SyncDirectory, name: str | None = None, cursor: str | None = None, limit: int | None = None
) -> Page:
    if cursor is not None:
        _token_cursor(cursor)
    items = [token_json(t) for t in d.list_tokens(name, after=cursor, limit=limit)]
    return _page(items, limit, lambda last: last["id"])


def _token_cursor(cursor: str) -> None:
    try:
        validate.token_id(cursor)
    except InvalidInput:
        raise InvalidInput(
            "invalid cursor: pass back the next_cursor of the previous page"
        ) from None


# -- admin API tokens ----------------------------------------------------------------------------


def admin_token_create(
    d: SyncDirectory, description: str = "", expires_in_days: float | None = None
) -> Json:
    info, token = d.create_admin_token(description, expires_in_days)
    return {**admin_token_json(info), "token": token}


def admin_token_revoke(d: SyncDirectory, token_id: str) -> Json:
    d.revoke_admin_token(token_id)
    return {"revoked": token_id}


def admin_token_list(d: SyncDirectory, cursor: str | None = None, limit: int | None = None) -> Page:
    if cursor is not None:
        _token_cursor(cursor)
    items = [admin_token_json(t) for t in d.list_admin_tokens(after=cursor, limit=limit)]
    return _page(items, limit, lambda last: last["id"])


# -- projects ------------------------------------------------------------------------------------


Warn = Callable[[str], None]


def _ignore(message: str) -> None:
    pass


def _existing_home(home: str | None) -> None:
    """Refuse a home that is not a folder here: /raw/ would only ever answer 404 for it.

    The proxy serves /raw/ from its own file system, so the check is made on the machine the
    command (or the admin API, inside the proxy) runs on, which should be the proxy's."""
    if not home or not os.path.isabs(home):
        return  # "" removes the home; a relative path is refused by the directory
    if not os.path.isdir(home):
        why = "is not a folder" if os.path.exists(home) else "does not exist"
        raise InvalidInput(f"--home {home} {why} on this machine (the proxy serves /raw/ from it)")


def _warn_overlaps(d: SyncDirectory, project: Project, warn: Warn) -> None:
    """Warn when the project's own port set overlaps the set of another project on the same
    host: members of either reach the other's servers there."""
    if project.ports is None or project.socket_dir is not None:
        return
    for other in d.list_projects():
        if other.id == project.id or other.ports is None or other.socket_dir is not None:
            continue
        same_host = other.host == project.host or (
            always_local(other.host) and always_local(project.host)
        )
        common = project.ports.intersection(other.ports)
        if same_host and common:
            warn(
                f"ports {common} of project {project.id} are also in the set "
                f"of project {other.id} on the same host ({other.host}): members of either "
                "project can reach the other's servers on them"
            )


def project_add(
    d: SyncDirectory,
    owner: str,
    host: str = "127.0.0.1",
    home: str | None = None,
    project_id: str | None = None,
    title: str = "",
    ports: str | None = None,
    socket_dir: str | None = None,
    socket_owner: int | str | None = None,
    warn: Warn = _ignore,
) -> Json:
    _existing_home(home)
    project = d.add_project(
        owner,
        host=host,
        home=home,
        project_id=project_id,
        title=title,
        ports=ports,
        socket_dir=socket_dir,
        socket_owner=socket_owner,
    )
    _warn_overlaps(d, project, warn)
    return project_json(project)


def project_set(
    d: SyncDirectory,
    project_id: str,
    host: str | None = None,
    home: str | None = None,
    title: str | None = None,
    ports: str | None = None,
    socket_dir: str | None = None,
    socket_owner: int | str | None = None,
    warn: Warn = _ignore,
) -> Json:
    """Change what is given (``home=""`` removes the home, ``ports="default"`` the own port
    set, ``socket_dir=""`` the socket folder); giving nothing is refused."""
    if all(v is None for v in (host, home, title, ports, socket_dir, socket_owner)):
        raise InvalidInput(
            "nothing to change: give --host, --home, --title, --ports, --socket-dir or "
            "--socket-owner"
        )
    _existing_home(home)
    project = d.set_project(
        project_id,
        host=host,
        home=home,
        title=title,
        ports=ports,
        socket_dir=socket_dir,
        socket_owner=socket_owner,
    )
    _warn_overlaps(d, project, warn)
    return project_json(project)


def project_put(
    d: SyncDirectory,
    project_id: str,
    owner: str,
    host: str = "127.0.0.1",
    home: str | None = None,
    title: str = "",
    collaborators: Sequence[str] = (),
    ports: str | None = None,
    socket_dir: str | None = None,
    socket_owner: int | str | None = None,
    warn: Warn = _ignore,
) -> tuple[Json, bool]:
    """Make the project exactly this, creating it when needed; returns (project, created)."""
    _existing_home(home)
    project, created = d.put_project(
        project_id, owner, host, home, title, collaborators, ports, socket_dir, socket_owner
    )
    _warn_overlaps(d, project, warn)
    return project_json(project), created


def project_get(d: SyncDirectory, project_id: str) -> Json:
    validate.project_id(project_id)
    project = d.get_project(project_id)
    if project is None:
        raise NotFound(f"no project with id {project_id!r}")
    return project_json(project)


def project_remove(d: SyncDirectory, project_id: str) -> Json:
    d.remove_project(project_id)
    return {"removed": project_id}


def project_list(d: SyncDirectory, cursor: str | None = None, limit: int | None = None) -> Page:
    if cursor is not None and not validate.is_project_id(cursor):
        raise InvalidInput("invalid cursor: pass back the next_cursor of the previous page")
    items = [project_json(p) for p in d.list_projects(after=cursor, limit=limit)]
    return _page(items, limit, lambda last: last["id"])


def collaborator_add(d: SyncDirectory, project_id: str, name: str) -> Json:
    d.add_collaborator(project_id, name)
    return project_get(d, project_id)


def collaborator_put(d: SyncDirectory, project_id: str, name: str) -> tuple[Json, bool]:
    """Make NAME a collaborator unless it already is one (idempotent); returns (project,
    changed). The owner is refused, as by ``collaborator_add``."""
    project = project_get(d, project_id)
    if name in project["collaborators"]:
        return project, False
    return collaborator_add(d, project_id, name), True


def collaborator_remove(d: SyncDirectory, project_id: str, name: str) -> Json:
    d.remove_collaborator(project_id, name)
    return project_get(d, project_id)


# -- sharing -------------------------------------------------------------------------------------


def share_set(
    d: SyncDirectory,
    policy: SharingPolicy | None,
    project_id: str,
    port: int,
    visibility: str,
    expires_in_days: float | None = None,
) -> Json:
    """Set a port's visibility. ``link`` returns the secret and link (shown this once; setting
    it again makes a new one and the old link stops working). ``private`` unshares."""
    validate.visibility(visibility)
    if visibility == "private" and expires_in_days is not None:
        raise InvalidInput("a private port has no expiry")
    if policy is not None:
        policy.check(visibility)
    share, secret = d.set_share(project_id, port, visibility, expires_in_days)
    if share is None:
        return {"project": project_id, "port": port, "visibility": "private"}
    return share_json(share, policy, secret)


def share_remove(d: SyncDirectory, project_id: str, port: int) -> Json:
    d.remove_share(project_id, port)
    return {"project": project_id, "port": port, "visibility": "private"}


def share_list(
    d: SyncDirectory,
    policy: SharingPolicy | None,
    project_id: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page:
    after = None
    if cursor is not None:
        pid, _, port = cursor.rpartition(":")
        if not validate.is_project_id(pid) or not port.isdigit() or len(port) > 5:
            raise InvalidInput("invalid cursor: pass back the next_cursor of the previous page")
        after = (pid, int(port))
    items = [share_json(s, policy) for s in d.list_shares(project_id, after=after, limit=limit)]
    return _page(items, limit, lambda last: f"{last['project']}:{last['port']}")
