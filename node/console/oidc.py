"""OpenID Connect: the console as a relying party of the site's identity provider.

Pages log in with the authorization code flow and PKCE (OpenID Connect Core 1.0 3.1, RFC 7636;
Authlib builds the request and redeems the code); the API takes the provider's JWTs as bearer
tokens (RFC 6750), verified here against the provider's JWKS with joserfc: signature, issuer,
audience, expiry. Keys are cached and read again when a token names a key not seen yet (the
provider rotated its keys), at most once a minute.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from authlib.integrations.requests_client import OAuth2Session
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

from node.config import OidcConfig
from node.store.accounts import Role

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
METADATA_TTL_S = 3600.0
KEYS_REFRESH_MIN_S = 60.0


class OidcError(Exception):
    """A token or a login the node does not accept; the message names why, never a claim's value."""


class OidcProvider:
    def __init__(self, config: OidcConfig):
        self.config = config
        self._lock = threading.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = -KEYS_REFRESH_MIN_S

    def _get(self, url: str) -> dict[str, Any]:
        try:
            response = requests.get(url, timeout=self.config.timeout_s)
            response.raise_for_status()
            data = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise OidcError(f"the identity provider did not answer ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise OidcError("the identity provider answered something that is not a JSON object")
        return data

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (OpenID Connect Discovery 1.0 4): its issuer is the
        configured one, it names its endpoints. Fetched outside the lock (a slow provider holds
        no other request), at most once an hour once it was read."""
        with self._lock:
            if self._metadata is not None and time.monotonic() - self._metadata_at < METADATA_TTL_S:
                return self._metadata
        data = self._get(self.config.issuer + "/.well-known/openid-configuration")
        if str(data.get("issuer", "")).rstrip("/") != self.config.issuer:
            raise OidcError("the provider's discovery document names another issuer")
        missing = [k for k in ("authorization_endpoint", "token_endpoint", "jwks_uri") if not isinstance(data.get(k), str)]
        if missing:
            raise OidcError(f"the provider's discovery document has no {', '.join(missing)}")
        with self._lock:
            self._metadata, self._metadata_at = data, time.monotonic()
        return data

    def _key_set(self, kid: str | None) -> KeySet:
        """The provider's keys; read again when a token names a key not among them (the provider
        rotated its keys), at most once a minute whatever the tokens say and whether the read
        works or not: a stream of tokens with made-up key ids costs the provider nothing."""
        with self._lock:
            keys = self._keys
            if keys is not None and (kid is None or any(k.kid == kid for k in keys.keys)):
                return keys
            if time.monotonic() - self._keys_at < KEYS_REFRESH_MIN_S:
                if keys is None:
                    raise OidcError("the identity provider's keys could not be read (tried again within a minute)")
                return keys  # the token's key is not among them: its signature check fails
            self._keys_at = time.monotonic()  # before the read: concurrent callers do not read too
        fresh = KeySet.import_key_set(self._get(self.metadata()["jwks_uri"]))  # type: ignore[arg-type]
        with self._lock:
            self._keys = fresh
        return fresh

    def _session(self, redirect_uri: str) -> OAuth2Session:
        return OAuth2Session(self.config.client_id, self.config.effective_secret(), scope=self.config.scopes,
                             redirect_uri=redirect_uri, code_challenge_method="S256",
                             token_endpoint_auth_method="client_secret_basic" if self.config.effective_secret()
                             else "none", default_timeout=self.config.timeout_s)

    def authorization_url(self, redirect_uri: str, state: str, nonce: str, code_verifier: str) -> str:
        url, _ = self._session(redirect_uri).create_authorization_url(
            self.metadata()["authorization_endpoint"], state=state, nonce=nonce, code_verifier=code_verifier)
        return url

    def redeem(self, redirect_uri: str, code: str, code_verifier: str, nonce: str) -> dict[str, Any]:
        """The claims of the ID token the code is exchanged for (checked, its nonce too)."""
        try:
            token = self._session(redirect_uri).fetch_token(
                self.metadata()["token_endpoint"], code=code, code_verifier=code_verifier)
        except Exception as exc:  # Authlib raises OAuthError, requests its own: both mean no login
            raise OidcError(f"the provider did not exchange the code ({type(exc).__name__})") from None
        if "id_token" not in token:
            raise OidcError("the provider returned no ID token")
        claims = self.verify(token["id_token"], self.config.client_id)
        if claims.get("nonce") != nonce:
            raise OidcError("the ID token's nonce is not this login's")
        return claims

    def verify(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """The claims of a JWT the provider signed for `audience` (default: the API's), not expired."""
        try:
            header = extract_compact(token.encode()).headers()
            kid = header.get("kid") if isinstance(header.get("kid"), str) else None
            decoded = jwt.decode(token, self._key_set(kid), algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                leeway=self.config.leeway_s,
                iss={"essential": True, "value": self.metadata()["issuer"]},  # exactly as published (a trailing /)
                aud={"essential": True, "value": audience or self.config.audience or self.config.client_id},
                exp={"essential": True}, sub={"essential": True},
            ).validate(decoded.claims)
        except JoseError as exc:
            raise OidcError(f"the token is not valid here: {exc.description or exc.error}") from None
        except ValueError:
            raise OidcError("the token is not a JWT this provider signed") from None
        return decoded.claims

    def name_of(self, claims: dict[str, Any]) -> str:
        name = claims.get(self.config.username_claim)
        return str(name) if isinstance(name, str) and name else str(claims["sub"])

    def role_of(self, claims: dict[str, Any]) -> Role | None:
        """The highest role the claims map to, else `default_role` (None: no access)."""
        value: Any = claims
        for part in self.config.roles_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            value = [value]
        values = [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
        roles = [Role(self.config.role_map[v]) for v in values if v in self.config.role_map]
        if not roles:
            return Role(self.config.default_role) if self.config.default_role else None
        return max(roles, key=list(Role).index)
