-- Version 3: sign-in with an OpenID provider and signed identity assertions for backends.
-- Accounts may be bound to the provider's subject (unique) and know an e-mail address; an
-- account made by signing in with the provider has no password (password_hash '').
-- identity_keys holds the ES256 keys every proxy on this directory signs assertions with.

ALTER TABLE accounts ADD COLUMN oidc_subject TEXT;
ALTER TABLE accounts ADD COLUMN email TEXT;
CREATE UNIQUE INDEX accounts_oidc_subject ON accounts (oidc_subject);

CREATE TABLE identity_keys (
    kid TEXT PRIMARY KEY,
    private_jwk TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
