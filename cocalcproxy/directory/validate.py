"""Pure checks for what goes into the directory. Each raises InvalidInput with a message that is
safe to show to the operator; the offending value is quoted with repr() so control characters
cannot reach a terminal or log line raw."""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
import uuid

from cocalcproxy.directory.model import InvalidInput
from cocalcproxy.directory.ports import PortListError, PortSet, parse_ports

NAME_MAX = 64
TITLE_MAX = 200
PASSWORD_MAX = 4096
HOME_MAX = 4096

_NAME = re.compile(r"[A-Za-z0-9._@][A-Za-z0-9._@-]{0,63}")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")

#: A port's visibility: members only (no share), anyone with the link, anyone.
VISIBILITIES = ("private", "link", "public")
DESCRIPTION_MAX = 200


def _shown(value: str, limit: int = 80) -> str:
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


def name(value: str) -> str:
    """1-64 characters of letters, digits, '.', '_', '@' and '-', not starting with '-' (so a
    name can never be mistaken for an option)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInput(
            f"invalid user name {_shown(str(value))}: use 1-{NAME_MAX} letters, digits, "
            "'.', '_', '@' or '-', not starting with '-'"
        )
    return value


def is_name(value: str) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def project_id(value: str) -> str:
    """A canonical project id: lower-case 8-4-4-4-12 hex, exactly as it appears in URLs."""
    if not isinstance(value, str) or not _CANONICAL_UUID.fullmatch(value):
        raise InvalidInput(
            f"invalid project id {_shown(str(value))}: expected a lower-case UUID such as "
            "'0b9d1c56-3f4a-4e6b-9a51-2c7d8e9f0a1b'"
        )
    return value


def is_project_id(value: str) -> bool:
    return isinstance(value, str) and _CANONICAL_UUID.fullmatch(value) is not None


def new_project_id() -> str:
    return str(uuid.uuid4())


def token_id(value: str) -> str:
    if not isinstance(value, str) or not _TOKEN_ID.fullmatch(value):
        raise InvalidInput(f"invalid token id {_shown(str(value))}: expected 16 hex digits")
    return value


def port(value: int) -> int:
    """A TCP port 1..65535 (an int, never a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInput(f"invalid port {_shown(str(value))}: expected a number 1-65535")
    return value


def visibility(value: str) -> str:
    if value not in VISIBILITIES:
        raise InvalidInput(
            f"invalid visibility {_shown(str(value))}: use one of " + ", ".join(VISIBILITIES)
        )
    return value


def description(value: str) -> str:
    """Like a title: up to 200 printable characters."""
    if not isinstance(value, str) or len(value) > DESCRIPTION_MAX:
        raise InvalidInput(f"invalid description: at most {DESCRIPTION_MAX} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") for c in value):
        raise InvalidInput("invalid description: control and formatting characters are not allowed")
    return value


def page_limit(value: int | None, maximum: int = 1000) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidInput(f"invalid limit: expected a number 1-{maximum}")
    return value


def host(value: str) -> str:
    """A backend host: a DNS name or an IP literal, nothing else (no scheme, port, path, user
    info or spaces). Names are lower-cased; IPv6 may be given with or without brackets and is
    stored without them, in its compressed form."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("invalid host '': give a host name or an IP address")
    text = value
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise InvalidInput(f"invalid host {_shown(value)}: scoped IPv6 addresses are refused")
        return address.compressed
    lowered = text.lower()
    labels = lowered.split(".")
    if (
        len(lowered) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or lowered.replace(".", "").isdigit()
    ):
        raise InvalidInput(
            f"invalid host {_shown(value)}: give a host name or an IP address only "
            "(no scheme, port, path or spaces)"
        )
    if all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        # 0x7f000001 or 0x7f.1: the C resolver reads these as IP addresses (inet_aton), which
        # would hide a loopback address from the shared-host rules: insist on the usual form.
        raise InvalidInput(
            f"invalid host {_shown(value)}: it reads as an IP address in another notation; "
            "give the address in its usual form (such as 127.0.0.1)"
        )
    return lowered


def _absolute_path(value: str | None, what: str, example: str) -> str | None:
    """An absolute path on this machine, normalised (one leading slash), or None."""
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or len(value) > HOME_MAX
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise InvalidInput(
            f"invalid {what} {_shown(str(value))}: give an absolute path such as {example}"
        )
    normalised = os.path.normpath(value)
    if normalised.startswith("//"):
        normalised = "/" + normalised.lstrip("/")
    return normalised


def home(value: str | None) -> str | None:
    """An absolute path on this machine (normalised), or None for "no home directory"."""
    return _absolute_path(value, "home directory", "/home/alice/project")


def title(value: str) -> str:
    """Up to 200 characters of printable text: control characters, format characters (such as
    the bidirectional overrides that make text read backwards), surrogates and private-use
    characters are refused, so a title cannot disguise itself in a listing or a terminal."""
    if not isinstance(value, str) or len(value) > TITLE_MAX:
        raise InvalidInput(f"invalid title: at most {TITLE_MAX} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") for c in value):
        raise InvalidInput("invalid title: control and formatting characters are not allowed")
    return value


def password(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput("the password must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > PASSWORD_MAX:
        raise InvalidInput(f"the password is too long (at most {PASSWORD_MAX} bytes)")
    if "\x00" in value:
        raise InvalidInput("the password must not contain NUL characters")
    return value


SUBJECT_MAX = 255
EMAIL_MAX = 254


def oidc_subject(value: str) -> str:
    """An OpenID Connect ``sub``: 1-255 printable ASCII characters (OpenID Connect Core 2)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= SUBJECT_MAX
        or not all(0x21 <= ord(c) <= 0x7E for c in value)
    ):
        raise InvalidInput(
            f"invalid OpenID subject {_shown(str(value))}: use 1-{SUBJECT_MAX} printable "
            "ASCII characters without spaces"
        )
    return value


def email(value: str | None) -> str | None:
    """An e-mail address as the provider stated it, or None when it is not plausible."""
    if not isinstance(value, str) or not 3 <= len(value) <= EMAIL_MAX:
        return None
    if value.count("@") != 1 or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        return None
    local, _, domain = value.partition("@")
    return value if local and domain else None


def expires_in_days(value: float | None) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, int | float)) or not (0 < value <= 36500):
        raise InvalidInput("the expiry must be a positive number of days (at most 36500)")
    return float(value)


def lifetime_seconds(value: float) -> float:
    if not isinstance(value, int | float) or not (0 < value <= 36500 * 86400):
        raise InvalidInput("the session lifetime must be a positive number of seconds")
    return float(value)


def ports(value: str | None) -> PortSet | None:
    """A project's port list in its normal form (see directory.ports); None or ``default``
    for "use the operator's --default-ports"."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "default"):
        return None
    try:
        return parse_ports(value)
    except PortListError as e:
        raise InvalidInput(f"invalid --ports: {e}") from None


def socket_dir(value: str | None) -> str | None:
    """An absolute folder for a project's Unix sockets (normalised), or None for TCP."""
    normalised = _absolute_path(value, "socket folder", "/run/cocalc/alice")
    if normalised is None:
        return None
    if normalised == "/":
        raise InvalidInput("invalid socket folder '/': give the project's own folder")
    return normalised


#: Largest uid accepted (uid_t is 32 bits; 2**32-1 is "no uid").
UID_MAX = 2**32 - 2


def socket_owner(value: int | str | None) -> int | None:
    """A numeric uid, or None for "the socket folder's owner"."""
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit() or (len(text) > 1 and text.startswith("0")) or int(text) > UID_MAX:
        raise InvalidInput(f"invalid socket owner {_shown(str(value))}: give a numeric uid")
    return int(text)
