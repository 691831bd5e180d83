"""cocalcproxy: reach the web servers running inside a project, over TLS, owners and collaborators only."""

__version__ = "0.1.0"
