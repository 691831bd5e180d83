-- Version 5: sessions derived from a sign-in (the sign-in hop's tickets and the project hosts'
-- sessions) carry the token hash of the main-host session they came from, so signing out ends
-- them together. NULL for a session made by signing in itself.

ALTER TABLE sessions ADD COLUMN family TEXT;
CREATE INDEX sessions_family ON sessions (family);
