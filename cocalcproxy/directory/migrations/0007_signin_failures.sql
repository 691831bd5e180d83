-- Version 7: failed password sign-ins, counted in the directory so that every proxy process on
-- it (workers, machines) applies one set of limits (guard/ratelimit.py). One row per counted
-- failure: the limiter's key ("address:...", "name:...", "device:...") and when. Rows older
-- than the longest window are deleted as new ones come in.

CREATE TABLE signin_failures (
    id @SERIAL_PRIMARY_KEY@,
    limit_key TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX signin_failures_key_at ON signin_failures (limit_key, at);
CREATE INDEX signin_failures_at ON signin_failures (at);
