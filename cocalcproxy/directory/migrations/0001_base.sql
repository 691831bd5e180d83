-- Version 1: accounts, projects, collaborators, sessions, API tokens and the change counter.
-- Shared by SQLite and PostgreSQL; @SERIAL_PRIMARY_KEY@ is the one word that differs.

CREATE TABLE change_counter (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO change_counter (id, value) VALUES (1, 0);

CREATE TABLE accounts (
    id @SERIAL_PRIMARY_KEY@,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
-- Names are unique regardless of case, so 'Alice' cannot pose as 'alice'.
CREATE UNIQUE INDEX accounts_name_ci ON accounts (lower(name));

CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    owner_id BIGINT NOT NULL REFERENCES accounts (id),
    host TEXT NOT NULL,
    home TEXT,
    created DOUBLE PRECISION NOT NULL
);
CREATE INDEX projects_owner ON projects (owner_id);

CREATE TABLE collaborators (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    PRIMARY KEY (project_id, account_id)
);
CREATE INDEX collaborators_account ON collaborators (account_id);

CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
CREATE INDEX sessions_account ON sessions (account_id);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    created DOUBLE PRECISION NOT NULL
);
CREATE INDEX api_tokens_account ON api_tokens (account_id);
