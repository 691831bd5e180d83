-- Version 8: state that a security property depends on, shared by every proxy process on the
-- directory (workers, machines) instead of kept per process or per state directory.
-- shared_secrets: the proxy's form key (CSRF tokens, device cookies, subdomain cookie tags, hop
-- tickets, the OpenID state cookie), made once by whichever process starts first (an existing
-- <state-dir>/secrets/csrf.key is adopted), then read by all.
-- used_once: what may be used only once (a hop ticket, an OpenID state), claimed by inserting its
-- digest under a unique key; rows go once the thing they record would have expired anyway.

CREATE TABLE shared_secrets (
    name TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);

CREATE TABLE used_once (
    purpose TEXT NOT NULL,
    digest TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (purpose, digest)
);
CREATE INDEX used_once_expires ON used_once (expires);
