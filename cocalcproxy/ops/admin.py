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
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from cocalcproxy.directory import operations as ops
from cocalcproxy.directory import validate
from cocalcproxy.directory.model import DirectoryError, InvalidInput
from cocalcproxy.directory.store import SyncDirectory, open_sync_directory
from cocalcproxy.ops.options import default_database_url, default_state_dir

PROG = "cocalcproxy"

DESCRIPTION = """\
Administer the cocalcproxy directory: users, API tokens, projects, shared ports
and admin API tokens.

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
  admin-token create               the token id (for 'admin-token revoke'), then the token
  project add ...                  the project id
  project share PID PORT --visibility link
                                   the share link (its secret is shown only once)

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


def _port(value: str) -> int:
    if not value.isdigit() or value.startswith("0") or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port 1-65535: {value!r}")
    return int(value)


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

    def share_policy(sub: Any) -> None:
        sub.add_argument(
            "--project-domain",
            metavar="DOMAIN",
            help="the proxy's --project-domain: print full URLs and refuse what it cannot serve",
        )
        sub.add_argument(
            "--allow-sharing",
            choices=ops.SHARING_LEVELS,
            help="with --project-domain, refuse what the proxy's --allow-sharing forbids",
        )

    sub = leaf(
        projects,
        "share",
        "set who may reach a port: private (members), link (anyone with the printed link), "
        "public (anyone); served on project subdomains only",
        cmd_project_share,
    )
    sub.add_argument("project_id", metavar="PID")
    sub.add_argument("port", metavar="PORT", type=_port)
    sub.add_argument("--visibility", choices=validate.VISIBILITIES, required=True)
    sub.add_argument(
        "--expires-in", metavar="DAYS", type=_days, help="end the share after DAYS days"
    )
    share_policy(sub)
    sub = leaf(projects, "unshare", "make a shared port private again", cmd_project_unshare)
    sub.add_argument("project_id", metavar="PID")
    sub.add_argument("port", metavar="PORT", type=_port)
    sub = leaf(projects, "shares", "list shared ports (all, or one project's)", cmd_project_shares)
    sub.add_argument("project_id", metavar="PID", nargs="?")
    share_policy(sub)

    admin_tokens = group("admin-token", "manage tokens for the admin API (--admin-api)")
    sub = leaf(admin_tokens, "create", "print a new admin API token", cmd_admin_token_create)
    sub.add_argument("--description", metavar="TEXT", default="", help="what the token is for")
    sub.add_argument(
        "--expires-in", metavar="DAYS", type=_days, help="expire after DAYS days [default: never]"
    )
    sub = leaf(
        admin_tokens, "revoke", "revoke an admin API token by its id", cmd_admin_token_revoke
    )
    sub.add_argument("token_id", metavar="TOKEN_ID")
    leaf(
        admin_tokens,
        "list",
        "list admin API tokens (ids, expiry; no secrets)",
        cmd_admin_token_list,
    )
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


# Each command gets (directory, parsed arguments, output, stdin) and calls one operation from
# cocalcproxy.directory.operations, the same the admin API calls; only the printing is here.


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


def cmd_user_add(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    password = read_password(stdin) if args.password_stdin else None
    doc = ops.user_add(d, args.name, password, oidc_subject=args.oidc_subject)
    if out.as_json:
        out.document(doc)
    elif "password" in doc:
        out.lines(doc["name"], doc["password"])
    else:
        out.lines(doc["name"])


def cmd_user_passwd(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.user_passwd(d, args.name, read_password(stdin))
    if out.as_json:
        out.document(doc)


def cmd_user_remove(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.user_remove(d, args.name)
    if out.as_json:
        out.document(doc)


def cmd_user_link(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.user_link(d, args.name, args.oidc_subject)
    if out.as_json:
        out.document(doc)


def cmd_user_unlink(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.user_link(d, args.name, None)
    if out.as_json:
        out.document(doc)


def cmd_user_list(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    users = ops.user_list(d).items
    if out.as_json:
        out.document(users)
    else:
        out.lines(
            *(
                u["name"] if "oidc_subject" not in u else f"{u['name']}\toidc={u['oidc_subject']}"
                for u in users
            )
        )


def cmd_token_create(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.token_create(d, args.name, args.expires_in)
    if out.as_json:
        out.document(doc)
    else:
        out.lines(doc["id"], doc["token"])


def cmd_token_revoke(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.token_revoke(d, args.token_id)
    if out.as_json:
        out.document(doc)


def cmd_token_list(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    tokens = ops.token_list(d, args.name).items
    if out.as_json:
        out.document(tokens)
    else:
        out.lines(*(f"{t['id']}\t{t['user']}\texpires={_expiry(t['expires'])}" for t in tokens))


def cmd_admin_token_create(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.admin_token_create(d, args.description, args.expires_in)
    if out.as_json:
        out.document(doc)
    else:
        out.lines(doc["id"], doc["token"])


def cmd_admin_token_revoke(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.admin_token_revoke(d, args.token_id)
    if out.as_json:
        out.document(doc)


def cmd_admin_token_list(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    tokens = ops.admin_token_list(d).items
    if out.as_json:
        out.document(tokens)
    else:
        out.lines(
            *(f"{t['id']}\texpires={_expiry(t['expires'])}\t{t['description']}" for t in tokens)
        )


def cmd_project_add(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.project_add(
        d,
        args.owner,
        host=args.host,
        home=args.home,
        project_id=args.project_id,
        title=args.title,
        ports=args.ports,
        socket_dir=args.socket_dir,
        socket_owner=args.socket_owner,
        warn=_warn,
    )
    if out.as_json:
        out.document(doc)
    else:
        out.lines(doc["id"])


def cmd_project_set(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.project_set(
        d,
        args.project_id,
        host=args.host,
        home=args.home,
        title=args.title,
        ports=args.ports,
        socket_dir=args.socket_dir,
        socket_owner=args.socket_owner,
        warn=_warn,
    )
    if out.as_json:
        out.document(doc)


def cmd_collaborator_add(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.collaborator_add(d, args.project_id, args.name)
    if out.as_json:
        out.document(doc)


def cmd_collaborator_remove(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.collaborator_remove(d, args.project_id, args.name)
    if out.as_json:
        out.document(doc)


def cmd_project_remove(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.project_remove(d, args.project_id)
    if out.as_json:
        out.document(doc)


def cmd_project_list(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    projects = ops.project_list(d).items
    if out.as_json:
        out.document(projects)
    else:
        out.lines(
            *(
                "\t".join(
                    (
                        p["id"],
                        f"owner={p['owner']}",
                        f"host={p['host']}",
                        f"home={p['home'] or '-'}",
                        f"ports={'default' if p['ports'] is None else p['ports']}",
                        f"sockets={p['socket_dir'] or '-'}",
                        f"collaborators={','.join(p['collaborators']) or '-'}",
                        f"title={p['title']}",
                    )
                )
                for p in projects
            )
        )


def _warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def _policy(args: Any) -> ops.SharingPolicy | None:
    """The command does not know a running proxy's options: with --project-domain it applies
    that domain and --allow-sharing (and prints full URLs); without, no policy is applied here
    and each proxy serves the share only when its own options allow it."""
    domain = getattr(args, "project_domain", None)
    if domain is None:
        return None
    return ops.SharingPolicy(getattr(args, "allow_sharing", None) or "public", domain.lower())


def cmd_project_share(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    policy = _policy(args)
    doc = ops.share_set(d, policy, args.project_id, args.port, args.visibility, args.expires_in)
    if out.as_json:
        out.document(doc)
        return
    if doc["visibility"] == "link":
        out.lines(doc["link"])
    elif "url" in doc:
        out.lines(doc["url"])
    if policy is None and doc["visibility"] != "private":
        sys.stderr.write(
            f"{PROG}: note: shared ports are served only on project subdomains, by proxies "
            "started with --project-domain and an --allow-sharing that permits "
            f"{doc['visibility']!r}\n"
        )


def cmd_project_unshare(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    doc = ops.share_remove(d, args.project_id, args.port)
    if out.as_json:
        out.document(doc)


def cmd_project_shares(d: SyncDirectory, args: Any, out: Output, stdin: IO[str]) -> None:
    shares = ops.share_list(d, _policy(args), args.project_id).items
    if out.as_json:
        out.document(shares)
    else:
        out.lines(
            *(
                f"{s['project']}\t{s['port']}\t{s['visibility']}\texpires={_expiry(s['expires'])}"
                for s in shares
            )
        )


def _expiry(value: float | None) -> str:
    return "never" if value is None else _timestamp(value)


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
