-- Version 6: tokens for the admin API, and per-port sharing beyond the project's members.

CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION
);

-- A row means the port is shared: visibility 'link' (secret_hash is the SHA-256 of the link's
-- secret) or 'public'. No row is 'private', the default.
CREATE TABLE port_shares (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    port INTEGER NOT NULL,
    visibility TEXT NOT NULL,
    secret_hash TEXT,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION,
    PRIMARY KEY (project_id, port)
);
