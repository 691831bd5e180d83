"""identity: keys kept in the directory, shared by proxies, rotated; tokens and their cache.

Two ``IdentityAssertions`` on one SQLite directory stand for two proxies; ``task.Clock`` drives
time, and the directory's own clock follows it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from cocalcproxy.directory import Account, Project
from cocalcproxy.directory.store import open_sync_directory
from cocalcproxy.guard.identity import IdentityAssertions, audience
from cocalcproxy.http.routing import Route
from cocalcproxy.http.site import Access

PID = "0b0e5c1a-3d4f-4a5b-8c6d-7e8f9a0b1c2d"
SERVER = Route(PID, "server", 8888, f"/{PID}/server/8888".encode(), b"/x")
SUB = Route(PID, "port", 8888, b"", b"/x", subdomain=True)
DAY = 86400.0


def kid_of(token: bytes | None) -> str:
    assert token is not None
    header = token.split(b".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + b"=" * (-len(header) % 4)))["kid"])


class AsyncOver:
    """The two directory calls IdentityAssertions makes, answered at once from a SyncDirectory."""

    def __init__(self, sync: Any) -> None:
        self.sync = sync

    def identity_keys(self) -> Any:
        return succeed(self.sync.identity_keys())

    def rotate_identity_keys(self, *args: Any) -> Any:
        return succeed(self.sync.rotate_identity_keys(*args))


class Keys(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        path = self.mktemp() + ".sqlite3"
        self.sync = open_sync_directory(f"sqlite:///{path}", clock=self.clock.seconds)
        self.addCleanup(self.sync.close)

    def proxy(self, **options: Any) -> IdentityAssertions:
        identity = IdentityAssertions(
            AsyncOver(self.sync),
            self.clock,
            hostname="proxy.example",
            project_domain="p.example",
            public_port=lambda: None,
            **options,
        )
        identity.prepare(self.sync)
        return identity

    def published(self, identity: IdentityAssertions) -> list[str]:
        return [k["kid"] for k in json.loads(identity.jwks_body)["keys"]]

    def access(self, owner: bool = True) -> Access:
        account = Account(7, "bob", "bob@example.org")
        project = Project(
            PID, 7 if owner else 1, "bob" if owner else "alice", "127.0.0.1", None, ""
        )
        return Access(account, project)

    def decode(self, identity: IdentityAssertions, token: bytes) -> dict[str, Any]:
        keys = KeySet.import_key_set(json.loads(identity.jwks_body))
        return dict(jwt.decode(token, keys, algorithms=["ES256"]).claims)

    def test_two_proxies_share_one_key_and_verify_each_other(self) -> None:
        a, b = self.proxy(), self.proxy()
        self.assertEqual(len(self.sync.identity_keys()), 1)
        self.assertEqual(a.jwks_body, b.jwks_body)
        token = a.assertion(SERVER, self.access())
        assert token is not None
        claims = self.decode(b, token)
        self.assertEqual(claims["aud"], "https://proxy.example/" + PID + "/server/8888/")
        self.assertEqual(claims["iss"], "https://proxy.example")
        self.assertEqual(
            (claims["sub"], claims["email"], claims["role"], claims["exp"] - claims["iat"]),
            ("bob", "bob@example.org", "owner", 60),
        )
        # No private half is ever published.
        for key in json.loads(a.jwks_body)["keys"]:
            self.assertNotIn("d", key)
            self.assertEqual((key["alg"], key["kty"], key["crv"]), ("ES256", "EC", "P-256"))

    def test_tokens_are_cached_for_half_their_life(self) -> None:
        a = self.proxy()
        first = a.assertion(SERVER, self.access())
        self.clock.advance(29)
        self.assertIs(a.assertion(SERVER, self.access()), first)
        self.assertNotEqual(a.assertion(SERVER, self.access(owner=False)), first)
        self.clock.advance(1)
        again = a.assertion(SERVER, self.access())
        self.assertNotEqual(again, first)
        assert again is not None
        claims = self.decode(a, again)
        self.assertEqual(claims["iat"], int(self.clock.seconds()))

    def test_subdomain_audience(self) -> None:
        self.assertEqual(
            audience(SUB, "proxy.example", "p.example", 8443), f"https://{PID}-8888.p.example:8443/"
        )
        self.assertEqual(
            audience(SERVER, "proxy.example", None, 8443),
            f"https://proxy.example:8443/{PID}/server/8888/",
        )

    def test_rotation_publishes_first_signs_later_and_retires_old_keys(self) -> None:
        a, b = self.proxy(), self.proxy()
        [(old, _, _)] = self.sync.identity_keys()
        self.clock.advance(30 * DAY + 1)
        a.refresh()
        b.refresh()  # both due; only one new key is made
        keys = self.sync.identity_keys()
        self.assertEqual(len(keys), 2)
        new = keys[-1][0]
        self.assertEqual(self.published(a), [old, new])
        self.assertEqual(self.published(b), [old, new])
        # Not signing with the new key until every proxy has had time to publish it.
        token = a.assertion(SERVER, self.access())
        self.assertEqual(kid_of(token), old)
        self.clock.advance(a.activation + 1)
        a.refresh()
        token = a.assertion(SERVER, self.access())
        self.assertEqual(kid_of(token), new)
        assert token is not None
        self.decode(b, token)
        # The old key stays published long after its last token expired, then goes.
        self.clock.advance(DAY - a.activation)
        a.refresh()
        b.refresh()
        self.assertEqual(self.published(a), [new])
        self.assertEqual(self.published(b), [new])
        self.assertEqual([k[0] for k in self.sync.identity_keys()], [new])

    def test_directory_failure_keeps_the_keys(self) -> None:
        a = self.proxy()
        before = a.jwks_body

        class Down:
            def identity_keys(self) -> Any:
                from twisted.internet.defer import fail

                from cocalcproxy.directory import Unavailable

                return fail(Unavailable("down"))

        a.directory = Down()
        done: list[object] = []
        a.refresh().addBoth(done.append)
        self.assertEqual(done, [None])
        self.assertEqual(a.jwks_body, before)
        self.assertIsNotNone(a.assertion(SERVER, self.access()))
