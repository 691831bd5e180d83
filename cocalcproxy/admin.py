"""The ``cocalcproxy`` administration command: accounts, API tokens and projects.

It opens the same database as the proxy (same defaults: ``--state-dir``, ``--database``), runs
each command in one transaction and exits. A running proxy sees every change within its polling
interval through the directory's change counter.

Output contract: a command that creates something prints its id (or token) alone on the last
line of stdout, so ``pid=$(cocalcproxy project add --owner alice)`` works; ``--json`` prints one
JSON document instead. Errors print one line on stderr and exit with status 1, having changed
nothing. Passwords are read from stdin (never from the command line, where other users could see
them) and never printed back; generated passwords are 24 random URL-safe characters.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from cocalcproxy.addresses import always_local
from cocalcproxy.directory.hashing import generated_password
from cocalcproxy.directory.model import Account, DirectoryError, InvalidInput, Project, TokenInfo
from cocalcproxy.directory.store import SyncDirectory, open_sync_directory
from cocalcproxy.options import default_database_url, default_state_dir

PROG = "cocalcproxy"

DESCRIPTION = """\
Administer the cocalcproxy directory: users, API tokens and projects.

Commands that create something print its id (or token) alone on the last line of
stdout, so pid=$(cocalcproxy project add --owner alice) works; --json prints JSON
instead. Errors go to stderr with exit status 1 and change nothing.
"""

EPILOG = """\
output of creating commands (last line is what scripts capture):
  user add NAME                    NAME, then the generated password (shown only once)
  user add NAME --password-stdin   NAME
  user add NAME --oidc-subject SUB NAME (no password: the account signs in with the provider)
  token create NAME                the token id (for 'token revoke'), then the token
  project add ...                  the project id

notes:
  'user remove' deletes the account with its sessions, API tokens and collaborations;
  it is refused while the user still owns projects ('project remove' them first).
  'user passwd' ends all of the user's sign-in sessions; API tokens keep working.
  'user link' binds an account to the OpenID provider's subject (its 'sub'); signing in with
  the provider then reaches that account. 'user list' shows bindings as oidc=SUB.
  'project set PID --home ""' removes the project's home directory (no /raw/ access).
  'project set PID --ports default' gives the project the proxy's --default-ports again;
  on a host shared by several projects the default is no port at all: give each project
  its own --ports (disjoint sets) or a --socket-dir.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 1 and one line for usage errors, like every other refusal
    (argparse would print the usage text above it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(json_only: bool = False) -> argparse.ArgumentParser:
    """Options accepted before or after the command. Defaults are suppressed here so a value
    given before the command is not overwritten by a sub-parser's default."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON instead of text",
    )
    if not json_only:
        where = parent.add_mutually_exclusive_group()
        where.add_argument(
            "--state-dir",
            metavar="DIR",
            default=argparse.SUPPRESS,
            help="state directory holding directory.sqlite3 [default: $COCALCPROXY_STATE_DIR, "
            "else $STATE_DIRECTORY, else ./cocalcproxy-state]",
        )
        where.add_argument(
            "--database",
            metavar="URL",
            default=argparse.SUPPRESS,
            help="sqlite:///ABSOLUTE/PATH or postgresql://USER@HOST[:PORT]/DB "
            "[default: sqlite:///<state-dir>/directory.sqlite3]",
        )
    return parent


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {value!r}") from None
    if not 0 < days <= 36500:
        raise argparse.ArgumentTypeError("must be a positive number of days (at most 36500)")
    return days


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def group(name: str, help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        return sub.add_subparsers(dest="action", metavar="ACTION", required=True)

    def leaf(actions: Any, name: str, help_text: str, handler: Callable[..., Any]) -> Any:
        sub = actions.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    leaf(
        commands,
        "init",
        "create the state directory and the database, or bring an existing database's schema "
        "up to date; safe to run again (every other command refuses a missing database)",
        cmd_init,
    )

    users = group("user", "manage user accounts")
    sub = leaf(
        users,
        "add",
        "create an account; without --password-stdin a password is generated and printed",
        cmd_user_add,
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    sub.add_argument(
        "--oidc-subject",
        metavar="SUB",
        help="bind the account to this OpenID provider subject; without --password-stdin "
        "the account has no password",
    )
    sub = leaf(
        users,
        "link",
        "bind an account to an OpenID provider subject; ends its sessions",
        cmd_user_link,
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--oidc-subject", metavar="SUB", required=True, help="the provider's sub")
    sub = leaf(
        users,
        "unlink",
        "remove an account's OpenID binding (refused for accounts without a password)",
        cmd_user_unlink,
    )
    sub.add_argument("name", metavar="NAME")
    sub = leaf(users, "passwd", "set the password; ends the user's sessions", cmd_user_passwd)
    sub.add_argument("name", metavar="NAME")
    sub.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the new password from one line of stdin",
    )
    sub = leaf(
        users,
        "remove",
        "delete the account, its sessions, tokens and collaborations "
        "(refused while it owns projects)",
        cmd_user_remove,
    )
    sub.add_argument("name", metavar="NAME")
    leaf(users, "list", "list the accounts", cmd_user_list)

    tokens = group("token", "manage API tokens")
    sub = leaf(tokens, "create", "print a new API token for the user", cmd_token_create)
    sub.add_argument("name", metavar="NAME")
    sub.add_argument(
        "--expires-in", metavar="DAYS", type=_days, help="expire after DAYS days [default: never]"
    )
    sub = leaf(tokens, "revoke", "revoke an API token by its id", cmd_token_revoke)
    sub.add_argument("token_id", metavar="TOKEN_ID")
    sub = leaf(tokens, "list", "list API tokens (ids, owners, expiry; no secrets)", cmd_token_list)
    sub.add_argument("name", metavar="NAME", nargs="?")

    projects = group("project", "manage projects and their collaborators")
    sub = leaf(projects, "add", "create a project and print its id", cmd_project_add)
    sub.add_argument("--owner", metavar="NAME", required=True, help="the owning user")
    sub.add_argument("--host", metavar="HOST", default="127.0.0.1", help="backend host name or IP")
    sub.add_argument("--home", metavar="DIR", help="absolute path served under /<pid>/raw/")
    sub.add_argument("--id", metavar="UUID", dest="project_id", help="a lower-case UUID")
    sub.add_argument("--title", metavar="TEXT", default="", help="a short description")
    _backend_arguments(sub, setting=False)
    sub = leaf(
        projects,
        "set",
        "change a project's host, home, title, ports or socket folder",
        cmd_project_set,
    )
    sub.add_argument("project_id", metavar="PID")
    sub.add_argument("--host", metavar="HOST")
    sub.add_argument("--home", metavar="DIR", help='absolute path, or "" for none')
    sub.add_argument("--title", metavar="TEXT")
    _backend_arguments(sub, setting=True)
    collaborators = projects.add_parser(
        "collaborator", help="add or remove a collaborator", description="manage collaborators"
    ).add_subparsers(dest="collaborator_action", metavar="ACTION", required=True)
    for name, text, handler in (
        ("add", "let NAME reach the project", cmd_collaborator_add),
        ("remove", "stop NAME reaching the project", cmd_collaborator_remove),
    ):
        sub = leaf(collaborators, name, text, handler)
        sub.add_argument("project_id", metavar="PID")
        sub.add_argument("name", metavar="NAME")
    sub = leaf(projects, "remove", "delete a project and its collaborator list", cmd_project_remove)
    sub.add_argument("project_id", metavar="PID")
    leaf(projects, "list", "list the projects", cmd_project_list)
    return parser


def _backend_arguments(sub: Any, setting: bool) -> None:
    sub.add_argument(
        "--ports",
        metavar="LIST",
        help="ports the project's routes may reach, e.g. 8000-8099,8888; 'none' for no port"
        + ("; 'default' for the proxy's --default-ports" if setting else "")
        + " [default: the proxy's --default-ports]",
    )
    sub.add_argument(
        "--socket-dir",
        metavar="DIR",
        help="serve the project's ports from the Unix sockets DIR/<port> instead of TCP"
        + (' ("" for TCP again)' if setting else ""),
    )
    sub.add_argument(
        "--socket-owner",
        metavar="UID",
        help="numeric uid that must own the socket folder and its sockets"
        + (' ("" for the folder\'s owner)' if setting else "")
        + " [default: the socket folder's owner]",
    )


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def lines(self, *lines: str) -> None:
        for line in lines:
            sys.stdout.write(line + "\n")

    def document(self, value: object) -> None:
        sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_password(stdin: IO[str]) -> str:
    """One line from stdin without its line ending; refuses an empty one. On a terminal the
    typing is not echoed."""
    if stdin.isatty():
        line = getpass.getpass("Password: ", stream=sys.stderr)
    else:
        line = stdin.readline()
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    if not line:
        raise InvalidInput("no password on standard input (an empty password is refused)")
    return line


def project_json(project: Project) -> dict[str, object]:
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


def token_json(info: TokenInfo) -> dict[str, object]:
    return {
        "id": info.id,
        "user": info.account_name,
        "created": info.created,
        "expires": info.expires,
    }


# Each command gets (directory, parsed arguments, output, stdin).


def cmd_init(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    before = d.schema_version()
    d.migrate()
    after = d.schema_version()
    where = d.dialect.describe()
    if out.as_json:
        out.document({"database": where, "created": before == 0, "schema_version": after})
    elif before == 0:
        out.lines(f"created {where} (schema version {after})")
    elif before < after:
        out.lines(f"upgraded {where} from schema version {before} to {after}")
    else:
        out.lines(f"{where} is ready (schema version {after})")


def user_json(account: Account) -> dict[str, object]:
    doc: dict[str, object] = {"id": account.id, "name": account.name}
    if account.oidc_subject is not None:
        doc["oidc_subject"] = account.oidc_subject
    if account.email is not None:
        doc["email"] = account.email
    return doc


def cmd_user_add(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    subject = args.oidc_subject
    generated = not args.password_stdin and subject is None
    password: str | None
    if args.password_stdin:
        password = read_password(stdin)
    else:
        password = generated_password() if generated else None
    account = d.add_user(args.name, password, oidc_subject=subject)
    if out.as_json:
        doc = user_json(account)
        if generated:
            doc["password"] = password
        out.document(doc)
    elif generated and password is not None:
        out.lines(account.name, password)
    else:
        out.lines(account.name)


def cmd_user_passwd(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    d.set_password(args.name, read_password(stdin))
    if out.as_json:
        out.document({"name": args.name})


def cmd_user_remove(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    d.remove_user(args.name)
    if out.as_json:
        out.document({"removed": args.name})


def cmd_user_link(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    account = d.link_oidc_subject(args.name, args.oidc_subject)
    if out.as_json:
        out.document(user_json(account))


def cmd_user_unlink(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    account = d.link_oidc_subject(args.name, None)
    if out.as_json:
        out.document(user_json(account))


def cmd_user_list(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    users = d.list_users()
    if out.as_json:
        out.document([user_json(u) for u in users])
    else:
        out.lines(
            *(
                u.name if u.oidc_subject is None else f"{u.name}\toidc={u.oidc_subject}"
                for u in users
            )
        )


def cmd_token_create(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    token_id, token = d.create_token(args.name, args.expires_in)
    if out.as_json:
        info = next(t for t in d.list_tokens(args.name) if t.id == token_id)
        out.document({**token_json(info), "token": token})
    else:
        out.lines(token_id, token)


def cmd_token_revoke(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    d.revoke_token(args.token_id)
    if out.as_json:
        out.document({"revoked": args.token_id})


def cmd_token_list(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    tokens = d.list_tokens(args.name)
    if out.as_json:
        out.document([token_json(t) for t in tokens])
    else:
        out.lines(
            *(
                f"{t.id}\t{t.account_name}\texpires="
                + ("never" if t.expires is None else _timestamp(t.expires))
                for t in tokens
            )
        )


def _existing_home(home: str | None) -> None:
    """Refuse a --home that is not a folder here: /raw/ would only ever answer 404 for it.

    The proxy serves /raw/ from its own file system, so the check is made on the machine the
    command runs on, which should be the proxy's."""
    if not home or not os.path.isabs(home):
        return  # "" removes the home; a relative path is refused by the directory
    if not os.path.isdir(home):
        why = "is not a folder" if os.path.exists(home) else "does not exist"
        raise InvalidInput(f"--home {home} {why} on this machine (the proxy serves /raw/ from it)")


def cmd_project_add(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    _existing_home(args.home)
    project = d.add_project(
        args.owner,
        host=args.host,
        home=args.home,
        project_id=args.project_id,
        title=args.title,
        ports=args.ports,
        socket_dir=args.socket_dir,
        socket_owner=args.socket_owner,
    )
    _warn_overlaps(d, project)
    if out.as_json:
        out.document(project_json(project))
    else:
        out.lines(project.id)


def _warn_overlaps(d: SyncDirectory, project: Project) -> None:
    """A warning (stderr, exit status 0) when the project's own port set overlaps the set of
    another project on the same host: members of either reach the other's servers there."""
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
            sys.stderr.write(
                f"{PROG}: warning: ports {common} of project {project.id} are also in the set "
                f"of project {other.id} on the same host ({other.host}): members of either "
                "project can reach the other's servers on them\n"
            )


def cmd_project_set(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    fields = (args.host, args.home, args.title, args.ports, args.socket_dir, args.socket_owner)
    if all(value is None for value in fields):
        raise InvalidInput(
            "nothing to change: give --host, --home, --title, --ports, --socket-dir or "
            "--socket-owner"
        )
    _existing_home(args.home)
    project = d.set_project(
        args.project_id,
        host=args.host,
        home=args.home,
        title=args.title,
        ports=args.ports,
        socket_dir=args.socket_dir,
        socket_owner=args.socket_owner,
    )
    _warn_overlaps(d, project)
    if out.as_json:
        out.document(project_json(project))


def cmd_collaborator_add(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    d.add_collaborator(args.project_id, args.name)
    _show_project(d, args.project_id, out)


def cmd_collaborator_remove(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    d.remove_collaborator(args.project_id, args.name)
    _show_project(d, args.project_id, out)


def _show_project(d: SyncDirectory, project_id: str, out: Output) -> None:
    if out.as_json:
        project = d.get_project(project_id)
        out.document(None if project is None else project_json(project))


def cmd_project_remove(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    d.remove_project(args.project_id)
    if out.as_json:
        out.document({"removed": args.project_id})


def cmd_project_list(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    projects = d.list_projects()
    if out.as_json:
        out.document([project_json(p) for p in projects])
    else:
        out.lines(
            *(
                "\t".join(
                    (
                        p.id,
                        f"owner={p.owner_name}",
                        f"host={p.host}",
                        f"home={p.home or '-'}",
                        f"ports={'default' if p.ports is None else p.ports}",
                        f"sockets={p.socket_dir or '-'}",
                        f"collaborators={','.join(p.collaborators) or '-'}",
                        f"title={p.title}",
                    )
                )
                for p in projects
            )
        )


def _timestamp(seconds: float) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def database_url(args: Any) -> str:
    database = getattr(args, "database", None)
    if database:
        return str(database)
    state_dir = getattr(args, "state_dir", None) or default_state_dir()
    return default_database_url(state_dir)


def main(
    argv: Sequence[str] | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run one admin command; returns the exit status (0, or 1 for any refusal)."""
    with contextlib.ExitStack() as stack:
        if stdout is not None:
            stack.enter_context(contextlib.redirect_stdout(stdout))
        if stderr is not None:
            stack.enter_context(contextlib.redirect_stderr(stderr))
        return _main(list(sys.argv[1:] if argv is None else argv), stdin or sys.stdin)
    raise AssertionError("unreachable")  # pragma: no cover


def _main(argv: list[str], stdin: IO[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "state_dir", None) is not None and getattr(args, "database", None):
            parser.error("give --state-dir or --database, not both")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    out = Output(bool(getattr(args, "json", False)))
    directory: SyncDirectory | None = None
    try:
        if args.handler is cmd_init:
            # Creating is explicit: only 'init' creates a database (and, for the default one,
            # the state directory); every other command refuses a missing or empty database.
            mode = "file" if getattr(args, "database", None) else "folder"
            directory = open_sync_directory(database_url(args), create=mode, migrate_to=0)
        else:
            directory = open_sync_directory(database_url(args), create="no")
        args.handler(directory, args, out, stdin)
    except DirectoryError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted, nothing changed\n")
        return 1
    finally:
        if directory is not None:
            directory.close()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
