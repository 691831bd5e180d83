"""Signing in with the platform's OpenID Connect provider (``--oidc-issuer``).

The authorization-code flow with PKCE (S256), as a confidential client:

1. ``GET /_/oidc/login?next=PATH`` makes ``state``, ``nonce`` and a PKCE verifier, seals them
   with ``next`` and an expiry into the ``__Host-cocalcproxy_oidc`` cookie (JWE, ``dir`` +
   ``A256GCM`` under a key derived from the directory's shared form key: host-only, Secure,
   HttpOnly, SameSite=Lax, 10 minutes) and redirects to the provider.
2. ``GET /_/oidc/callback?code=...&state=...`` needs that cookie from the same browser, with the
   same ``state``, not used before (claimed in the directory's ``used_once``, so once across
   every worker and machine); the cookie is
   cleared at once. The code is exchanged at the token endpoint (with the verifier and the client
   secret); the ID token is checked (below); the account is found or made by the directory
   (``oidc_sign_in``); a proxy session starts, exactly as after a password sign-in.

The ID token (joserfc): signed with an algorithm the provider announces in its discovery
document *and* that is asymmetric (RS*, PS*, ES*, EdDSA; never ``none``, never HS*, so a
provider's public key can never be used as an HMAC secret); by a key from the provider's JWKS
(cached; fetched again when a token names an unknown ``kid``, at most once per
``jwks_refetch_interval``); ``iss`` is the issuer; ``aud`` contains the client id (and ``azp`` is
the client id when there are several audiences); ``exp`` in the future, ``iat`` not in the future,
both with ``leeway`` seconds of clock skew; ``nonce`` equal to the one sealed in the cookie;
``sub`` present.

Every provider call is asynchronous (treq) with a timeout, never follows redirects and reads at
most ``MAX_RESPONSE`` bytes. Discovery is fetched when first needed and then once an hour; a
provider that cannot be reached gives the person a clear page (502) and the operator one line.
Nothing the provider sends reaches a page except through twisted.web.template's escaping.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit

import treq
from joserfc import jwe, jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

log = Logger()

#: Signature algorithms an ID token may use (those of them the provider announces).
ASYMMETRIC = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
MAX_RESPONSE = 1024 * 1024
STATE_LIFETIME = 600.0
#: The ``used_once`` purpose of states (directory.use_once).
STATE_PURPOSE = "oidc-state"
DISCOVERY_TTL = 3600.0


class SignInError(Exception):
    """A refused sign-in. ``public`` is constant text for the page; ``detail`` is for the log
    (it may quote the provider, so it is only ever logged, with repr)."""

    def __init__(self, status: int, public: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.public = public
        self.detail = detail


def _unreachable(detail: str) -> SignInError:
    return SignInError(
        502,
        "The identity provider could not be reached or gave an answer that cannot be used. "
        "Try again shortly; if it keeps happening, tell the operator.",
        detail,
    )


def _refused(detail: str) -> SignInError:
    return SignInError(
        403,
        "The identity provider's answer could not be trusted, so you are not signed in. "
        "Start again from the sign-in page.",
        detail,
    )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: object, what: str) -> str:
    """An https URL (http only to a loopback address, for tests and local providers)."""
    if not isinstance(url, str) or len(url) > 2048:
        raise _unreachable(f"{what} is missing or not a string")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return url
    raise _unreachable(f"{what} {url!r} is not an https URL")


def check_issuer_option(issuer: str) -> str:
    """For the command line: the issuer as given, or ValueError saying what is wrong."""
    parts = urlsplit(issuer)
    if parts.query or parts.fragment or not parts.hostname:
        raise ValueError("must be a URL without query or fragment, e.g. https://id.example.org")
    if parts.scheme != "https" and not (
        parts.scheme == "http" and is_loopback_host(parts.hostname)
    ):
        raise ValueError("must be an https URL (http only for a loopback address)")
    return issuer


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    algorithms: tuple[str, ...]
    client_secret_post: bool


def parse_metadata(document: object, issuer: str) -> ProviderMetadata:
    """The parts of a discovery document the flow needs, checked (pure)."""
    if not isinstance(document, dict):
        raise _unreachable("the discovery document is not a JSON object")
    if document.get("issuer") != issuer:
        raise _unreachable(
            f"the discovery document names issuer {str(document.get('issuer'))[:200]!r}, "
            f"not {issuer!r}"
        )
    announced = document.get("id_token_signing_alg_values_supported", ["RS256"])
    if not isinstance(announced, list):
        raise _unreachable("id_token_signing_alg_values_supported is not a list")
    algorithms = tuple(a for a in ASYMMETRIC if a in announced)
    if not algorithms:
        raise _unreachable(f"no usable ID token algorithm among {announced[:10]!r}")
    methods = document.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        raise _unreachable("the provider does not support PKCE with S256")
    auth_methods = document.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
    if not isinstance(auth_methods, list):
        auth_methods = ["client_secret_basic"]
    end_session = document.get("end_session_endpoint")
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=check_url(
            document.get("authorization_endpoint"), "authorization_endpoint"
        ),
        token_endpoint=check_url(document.get("token_endpoint"), "token_endpoint"),
        jwks_uri=check_url(document.get("jwks_uri"), "jwks_uri"),
        end_session_endpoint=(
            check_url(end_session, "end_session_endpoint") if end_session is not None else None
        ),
        algorithms=algorithms,
        client_secret_post=(
            "client_secret_basic" not in auth_methods and "client_secret_post" in auth_methods
        ),
    )


def token_header(id_token: str) -> dict[str, Any]:
    """The protected header of a compact JWS, or SignInError."""
    try:
        header = jws.extract_compact(id_token.encode("ascii")).protected
    except (JoseError, ValueError, UnicodeError) as e:
        raise _refused(f"the ID token cannot be parsed: {e}") from None
    return dict(header)


def validate_id_token(
    id_token: str,
    keys: KeySet,
    metadata: ProviderMetadata,
    client_id: str,
    nonce: str,
    now: float,
    leeway: int = 60,
) -> dict[str, Any]:
    """The ID token's claims when every check in the module docstring passes (pure)."""
    header = token_header(id_token)
    algorithm = header.get("alg")
    if algorithm not in metadata.algorithms:
        raise _refused(f"the ID token is signed with {str(algorithm)[:20]!r}, not allowed")
    try:
        token = jwt.decode(id_token, keys, algorithms=list(metadata.algorithms))
    except (JoseError, ValueError) as e:
        raise _refused(f"the ID token's signature does not verify: {type(e).__name__}") from None
    claims = dict(token.claims)
    registry = jwt.JWTClaimsRegistry(
        now=int(now),
        leeway=leeway,
        iss={"essential": True, "value": metadata.issuer},
        aud={"essential": True, "value": client_id},
        exp={"essential": True},
        iat={"essential": True},
        sub={"essential": True},
        nonce={"essential": True, "value": nonce},
    )
    try:
        registry.validate(claims)
    except (JoseError, ValueError, TypeError) as e:
        raise _refused(f"the ID token's claims are not acceptable: {e}") from None
    audiences = claims.get("aud")
    if isinstance(audiences, list) and len(audiences) > 1 and claims.get("azp") != client_id:
        raise _refused("the ID token has several audiences and another authorized party")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise _refused("the ID token has no subject")
    return claims


@dataclass(frozen=True)
class ProviderIdentity:
    subject: str
    username: str
    email: str | None


def _verified(claims: dict[str, Any]) -> bool:
    value = claims.get("email_verified")
    return value is True or value == "true"


def identity_from_claims(
    claims: dict[str, Any],
    username_claim: str,
    allowed_domains: Sequence[str],
    valid_name: Callable[[str], bool],
) -> ProviderIdentity:
    """Who the provider says this is (pure).

    The user name is the ``username_claim`` claim when it is a valid account name, else the
    verified ``email`` when that is one. The e-mail address counts only when ``email_verified``.
    With ``allowed_domains``, only a verified address in one of those domains may sign in.
    """
    email = claims.get("email") if _verified(claims) else None
    if not isinstance(email, str):
        email = None
    if allowed_domains:
        domain = email.rsplit("@", 1)[-1].lower() if email and "@" in email else None
        if domain is None or domain not in allowed_domains:
            raise SignInError(
                403,
                "Your account at the identity provider is not allowed to sign in here (its "
                "verified e-mail address is not in a domain this proxy accepts).",
                f"e-mail domain {domain!r} is not allowed",
            )
    candidates = [claims.get(username_claim), email]
    username = next((c for c in candidates if isinstance(c, str) and valid_name(c)), None)
    if username is None:
        raise SignInError(
            403,
            "The identity provider did not give a user name this proxy can use. Ask the "
            "operator to create your account.",
            f"no usable {username_claim!r} or verified email claim",
        )
    return ProviderIdentity(str(claims["sub"]), username, email)


# --- the state cookie ---------------------------------------------------------------------------


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class FlowState:
    state: str
    nonce: str
    verifier: str
    next_path: str
    expires: float


class StateSealer:
    """Seals a ``FlowState`` into the cookie value and opens it again (JWE dir/A256GCM)."""

    ALGORITHMS = ["dir", "A256GCM"]

    def __init__(self, secret: bytes) -> None:
        derived = hmac.new(secret, b"cocalcproxy oidc state cookie", hashlib.sha256).digest()
        self.key = OctKey.import_key(derived)

    def new(self, next_path: str, now: float) -> FlowState:
        return FlowState(
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(48),
            next_path,
            now + STATE_LIFETIME,
        )

    def seal(self, flow: FlowState) -> str:
        body = json.dumps(
            {
                "s": flow.state,
                "n": flow.nonce,
                "v": flow.verifier,
                "p": flow.next_path,
                "e": flow.expires,
            }  # fmt: skip
        ).encode()
        return jwe.encrypt_compact(
            {"alg": "dir", "enc": "A256GCM"}, body, self.key, algorithms=self.ALGORITHMS
        )

    def open(self, value: str, now: float) -> FlowState | None:
        try:
            plain = jwe.decrypt_compact(value, self.key, algorithms=self.ALGORITHMS).plaintext
            data = json.loads(plain or b"")
            flow = FlowState(
                str(data["s"]), str(data["n"]), str(data["v"]), str(data["p"]), float(data["e"])
            )
        except (JoseError, ValueError, KeyError, TypeError):
            return None
        return flow if flow.expires > now else None


# --- talking to the provider ----------------------------------------------------------------------


@dataclass(frozen=True)
class OIDCSettings:
    issuer: str
    client_id: str
    name: str
    client_secret: str = field(default="", repr=False)
    client_secret_file: str = ""
    username_claim: str = "preferred_username"
    allowed_domains: tuple[str, ...] = ()

    def with_secret(self) -> OIDCSettings:
        """These settings with the secret read from ``client_secret_file`` (one line);
        ValueError saying what is wrong."""
        path = self.client_secret_file
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --oidc-client-secret-file {path}: {e}") from None
        if not secret or "\n" in secret:
            raise ValueError(f"--oidc-client-secret-file {path} must hold one secret line")
        return replace(self, client_secret=secret)


class ProviderClient:
    """Discovery, keys and the token endpoint over treq (injected ``http``, a treq HTTPClient)."""

    def __init__(
        self,
        settings: OIDCSettings,
        clock: Any,
        http: Any,
        *,
        timeout: float = 10.0,
        jwks_refetch_interval: float = 30.0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.http = http
        self.timeout = timeout
        self.jwks_refetch_interval = jwks_refetch_interval
        self._metadata: ProviderMetadata | None = None
        self._metadata_until = 0.0
        self._keys: KeySet | None = None
        self._last_refetch = float("-inf")

    @inlineCallbacks
    def _json(self, method: str, url: str, **kwargs: Any):  # type: ignore[no-untyped-def]
        """A JSON object from the provider: (status, object); SignInError when unreachable."""
        try:
            response = yield self.http.request(
                method, url, timeout=self.timeout, allow_redirects=False, **kwargs
            )
            chunks: list[bytes] = []
            size = [0]

            def collect(data: bytes) -> None:
                size[0] += len(data)
                if size[0] > MAX_RESPONSE:
                    raise ValueError("answer too large")
                chunks.append(data)

            yield treq.collect(response, collect)
        except SignInError:
            raise
        except Exception as e:
            raise _unreachable(f"{method} {url}: {type(e).__name__}: {e}") from None
        try:
            document = json.loads(b"".join(chunks))
        except ValueError:
            raise _unreachable(f"{method} {url}: answer {response.code} is not JSON") from None
        if not isinstance(document, dict):
            raise _unreachable(f"{method} {url}: answer is not a JSON object")
        return response.code, document

    @property
    def last_metadata(self) -> ProviderMetadata | None:
        """The discovery document last read, even if it is due to be read again."""
        return self._metadata

    @inlineCallbacks
    def metadata(self):  # type: ignore[no-untyped-def]
        now = self.clock.seconds()
        if self._metadata is not None and now < self._metadata_until:
            return self._metadata
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        code, document = yield self._json("GET", url)
        if code != 200:
            raise _unreachable(f"discovery at {url} answered {code}")
        self._metadata = parse_metadata(document, self.settings.issuer)
        self._metadata_until = now + DISCOVERY_TTL
        return self._metadata

    @inlineCallbacks
    def _fetch_keys(self, metadata: ProviderMetadata):  # type: ignore[no-untyped-def]
        code, document = yield self._json("GET", metadata.jwks_uri)
        if code != 200:
            raise _unreachable(f"the JWKS at {metadata.jwks_uri} answered {code}")
        usable = [
            key
            for key in document.get("keys", [])
            if isinstance(key, dict)
            and key.get("kty") in ("RSA", "EC", "OKP")
            and key.get("use", "sig") == "sig"
        ]
        try:
            keys = KeySet.import_key_set({"keys": usable})
        except (JoseError, ValueError, KeyError, TypeError) as e:
            raise _unreachable(f"the JWKS cannot be read: {e}") from None
        self._keys = keys
        return keys

    @inlineCallbacks
    def keys_for(self, metadata: ProviderMetadata, kid: object):  # type: ignore[no-untyped-def]
        """The provider's keys, fetched again when ``kid`` is unknown: at most once per
        ``jwks_refetch_interval``, so a flood of unknown key ids cannot flood the provider."""
        keys = self._keys
        if keys is None:
            keys = yield self._fetch_keys(metadata)
        known = {k.kid for k in keys.keys}
        if isinstance(kid, str) and kid not in known:
            now = self.clock.seconds()
            if now - self._last_refetch >= self.jwks_refetch_interval:
                self._last_refetch = now
                log.info(
                    "unknown OpenID provider key {kid!r}; fetching the JWKS again", kid=kid[:100]
                )
                keys = yield self._fetch_keys(metadata)
        return keys

    @inlineCallbacks
    def exchange(  # type: ignore[no-untyped-def]
        self, metadata: ProviderMetadata, code: str, verifier: str, redirect_uri: str
    ):
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        headers = {b"Accept": [b"application/json"]}
        if metadata.client_secret_post:
            form["client_id"] = self.settings.client_id
            form["client_secret"] = self.settings.client_secret
        else:
            # RFC 6749 2.3.1: both parts form-urlencoded before they are joined and encoded.
            pair = (
                quote_plus(self.settings.client_id) + ":" + quote_plus(self.settings.client_secret)
            )
            headers[b"Authorization"] = [b"Basic " + base64.b64encode(pair.encode("utf-8"))]
        status, document = yield self._json(
            "POST", metadata.token_endpoint, data=form, headers=headers
        )
        if status != 200:
            raise _refused(
                f"the token endpoint answered {status}: {str(document.get('error'))[:100]!r}"
            )
        id_token = document.get("id_token")
        if not isinstance(id_token, str):
            raise _refused("the token endpoint's answer has no ID token")
        return id_token

    def authorization_url(
        self, metadata: ProviderMetadata, flow: FlowState, redirect_uri: str
    ) -> str:
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.settings.client_id,
                "redirect_uri": redirect_uri,
                "scope": "openid profile email",
                "state": flow.state,
                "nonce": flow.nonce,
                "code_challenge": pkce_challenge(flow.verifier),
                "code_challenge_method": "S256",
            }
        )
        separator = "&" if "?" in metadata.authorization_endpoint else "?"
        return metadata.authorization_endpoint + separator + query

    def end_session_url(self, metadata: ProviderMetadata, after: str) -> str | None:
        if metadata.end_session_endpoint is None:
            return None
        query = urlencode({"client_id": self.settings.client_id, "post_logout_redirect_uri": after})
        separator = "&" if "?" in metadata.end_session_endpoint else "?"
        return metadata.end_session_endpoint + separator + query

    @inlineCallbacks
    def sign_in(self, code: str, flow: FlowState, redirect_uri: str):  # type: ignore[no-untyped-def]
        metadata = yield self.metadata()
        id_token = yield self.exchange(metadata, code, flow.verifier, redirect_uri)
        header = token_header(id_token)
        keys = yield self.keys_for(metadata, header.get("kid"))
        return validate_id_token(
            id_token, keys, metadata, self.settings.client_id, flow.nonce, self.clock.seconds()
        )
