-- Version 2: API tokens may expire, projects get a title, expired rows are found by index.

ALTER TABLE api_tokens ADD COLUMN expires DOUBLE PRECISION;
ALTER TABLE projects ADD COLUMN title TEXT NOT NULL DEFAULT '';
CREATE INDEX api_tokens_expires ON api_tokens (expires);
CREATE INDEX sessions_expires ON sessions (expires);
