-- Version 4: per-project port sets and Unix-socket backends (issue 16). NULL everywhere means
-- "not set": the operator's --default-ports, TCP to the project's host.

ALTER TABLE projects ADD COLUMN ports TEXT;
ALTER TABLE projects ADD COLUMN socket_dir TEXT;
ALTER TABLE projects ADD COLUMN socket_owner BIGINT;
CREATE INDEX projects_host ON projects (host);
