"""cocalcproxy: reach the web servers inside a project over TLS, owner and collaborators only."""

__version__ = "0.1.0"
