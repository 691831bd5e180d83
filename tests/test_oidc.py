"""guard.oidc without a browser: the pure checks, the state cookie, and the provider client's key
cache against the scriptable provider on loopback (task.Clock for the client's time)."""

from __future__ import annotations

import time
from typing import Any

from joserfc.jwk import RSAKey
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from cocalcproxy.directory import validate
from cocalcproxy.guard.oidc import (
    OIDCSettings,
    ProviderClient,
    SignInError,
    StateSealer,
    check_issuer_option,
    identity_from_claims,
    parse_metadata,
    pkce_challenge,
    validate_id_token,
)
from tests.oidc_support import CLIENT_ID, FakeProvider

ISSUER = "https://id.example.org"


def document(**changes: Any) -> dict[str, Any]:
    doc = {
        "issuer": ISSUER,
        "authorization_endpoint": ISSUER + "/auth",
        "token_endpoint": ISSUER + "/token",
        "jwks_uri": ISSUER + "/jwks",
        "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"],
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


class Metadata(unittest.TestCase):
    def test_only_asymmetric_algorithms_survive(self) -> None:
        metadata = parse_metadata(document(), ISSUER)
        self.assertEqual(metadata.algorithms, ("RS256",))
        self.assertIsNone(metadata.end_session_endpoint)
        self.assertFalse(metadata.client_secret_post)

    def test_refusals(self) -> None:
        for doc in (
            document(issuer="https://evil.example"),
            document(id_token_signing_alg_values_supported=["HS256", "none"]),
            document(token_endpoint="http://id.example.org/token"),
            document(jwks_uri="file:///etc/passwd"),
            document(authorization_endpoint=None),
            document(code_challenge_methods_supported=["plain"]),
            ["not", "an", "object"],
        ):
            with self.assertRaises(SignInError) as caught:
                parse_metadata(doc, ISSUER)
            self.assertEqual(caught.exception.status, 502)
        # http only to loopback.
        loopback = "http://127.0.0.1:9"
        parse_metadata(
            {**document(issuer=loopback), "token_endpoint": loopback + "/t",
             "authorization_endpoint": loopback + "/a", "jwks_uri": loopback + "/j"},
            loopback,
        )  # fmt: skip

    def test_issuer_option(self) -> None:
        for good in ("https://id.example.org", "http://localhost:8080/realms/x", "http://[::1]:1"):
            self.assertEqual(check_issuer_option(good), good)
        for bad in ("http://id.example.org", "https://x/?a=1", "https://x/#f", "ftp://x", "x"):
            with self.assertRaises(ValueError):
                check_issuer_option(bad)


class Claims(unittest.TestCase):
    def claims(self, **changes: Any) -> dict[str, Any]:
        claims = {"sub": "s1", "preferred_username": "carol", "email": "carol@Example.org",
                  "email_verified": True}  # fmt: skip
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def who(self, domains: tuple[str, ...] = (), claim: str = "preferred_username", **c: Any):  # type: ignore[no-untyped-def]
        return identity_from_claims(self.claims(**c), claim, domains, validate.is_name)

    def test_username_and_its_fallback(self) -> None:
        self.assertEqual(self.who().username, "carol")
        self.assertEqual(self.who(preferred_username=None).username, "carol@Example.org")
        self.assertEqual(self.who(preferred_username="-bad name").username, "carol@Example.org")
        self.assertEqual(self.who(claim="nickname", nickname="cc").username, "cc")
        with self.assertRaisesRegex(SignInError, "usable"):
            self.who(preferred_username=None, email_verified=False)
        # An unverified address is never used, nor passed on.
        self.assertIsNone(self.who(email_verified="false").email)

    def test_allowed_domains(self) -> None:
        self.assertEqual(self.who(("example.org",)).email, "carol@Example.org")
        for changes in (
            {"email_verified": False},
            {"email": None},
            {"email": "carol@example.org.evil"},
            {"email": "carol@sub.example.org"},
        ):
            with self.assertRaises(SignInError) as caught:
                self.who(("example.org",), **changes)
            self.assertEqual(caught.exception.status, 403)


class StateCookie(unittest.TestCase):
    def test_seal_open_expire_and_tamper(self) -> None:
        sealer = StateSealer(b"k" * 32)
        flow = sealer.new("/next", 1000.0)
        value = sealer.seal(flow)
        self.assertNotIn(flow.verifier, value)
        self.assertNotIn(flow.nonce, value)
        self.assertEqual(sealer.open(value, 1000.0), flow)
        self.assertIsNone(sealer.open(value, 1000.0 + 601))
        self.assertIsNone(StateSealer(b"o" * 32).open(value, 1000.0))
        self.assertIsNone(sealer.open(value[:-3] + "AAA", 1000.0))
        self.assertIsNone(sealer.open("garbage", 1000.0))
        self.assertEqual(len(pkce_challenge(flow.verifier)), 43)


class IdToken(unittest.TestCase):
    def setUp(self) -> None:
        self.key = RSAKey.generate_key(2048, auto_kid=True)
        self.metadata = parse_metadata(document(), ISSUER)
        from joserfc.jwk import KeySet

        self.keys = KeySet([self.key])

    def token(self, **changes: Any) -> str:
        from joserfc import jwt

        now = int(time.time())
        claims = {"iss": ISSUER, "aud": CLIENT_ID, "sub": "s", "iat": now, "exp": now + 60,
                  "nonce": "n"}  # fmt: skip
        claims.update(changes)
        return jwt.encode({"alg": "RS256", "kid": self.key.kid}, claims, self.key)

    def check(self, token: str, nonce: str = "n") -> dict[str, Any]:
        return validate_id_token(token, self.keys, self.metadata, CLIENT_ID, nonce, time.time())

    def test_accepts_and_allows_small_skew(self) -> None:
        now = int(time.time())
        self.assertEqual(self.check(self.token())["sub"], "s")
        self.check(self.token(iat=now + 30))
        self.check(self.token(exp=now - 30))
        self.check(self.token(aud=[CLIENT_ID, "x"], azp=CLIENT_ID))

    def test_refuses(self) -> None:
        now = int(time.time())
        for token, nonce in (
            (self.token(), "other"),
            (self.token(nonce=None), "n"),
            (self.token(iat=now + 120), "n"),
            (self.token(exp=now - 120), "n"),
            (self.token(aud="x"), "n"),
            (self.token(aud=[CLIENT_ID, "x"]), "n"),
            (self.token(iss=ISSUER + "/"), "n"),
            (self.token()[:-4] + "AAAA", "n"),
            ("not.a.token", "n"),
        ):
            with self.assertRaises(SignInError):
                self.check(token, nonce)


class KeyCache(unittest.TestCase):
    """The provider client fetches the JWKS again for an unknown kid, at most once per
    interval; known kids never cause a fetch."""

    @defer.inlineCallbacks
    def test_unknown_kid_refetch_is_rate_limited(self):  # type: ignore[no-untyped-def]
        from treq.client import HTTPClient

        provider = yield FakeProvider().start(self)
        fetched: list[str] = []
        original = provider.render

        def counting(request: Any) -> bytes:
            if request.path == b"/jwks":
                fetched.append(provider.key.kid)
            return original(request)

        provider.render = counting  # type: ignore[method-assign]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        clock = Clock()
        client = ProviderClient(
            OIDCSettings(provider.issuer, CLIENT_ID, "x", client_secret="s"),
            clock,
            HTTPClient(Agent(reactor, pool=pool)),  # type: ignore[arg-type]
            jwks_refetch_interval=30,
        )
        metadata = yield client.metadata()
        first = provider.key.kid
        keys = yield client.keys_for(metadata, first)
        yield client.keys_for(metadata, first)
        self.assertEqual(len(fetched), 1)
        # The provider rotates: the new kid is fetched at once ...
        provider.key = RSAKey.generate_key(2048, auto_kid=True)
        keys = yield client.keys_for(metadata, provider.key.kid)
        self.assertEqual([k.kid for k in keys.keys], [provider.key.kid])
        self.assertEqual(len(fetched), 2)
        # ... but after that, a stream of unknown kids reaches the provider once per 30 s only.
        for i in range(5):
            yield client.keys_for(metadata, f"unknown-{i}")
        self.assertEqual(len(fetched), 2)
        clock.advance(30)
        for i in range(5):
            yield client.keys_for(metadata, f"unknown-again-{i}")
        self.assertEqual(len(fetched), 3)
