"""Sphinx configuration for the cocalcproxy documentation (plain reStructuredText, no extensions).

Build with warnings as errors, as CI does::

    python -m sphinx -W -b html docs docs/_build/html
"""

project = "cocalcproxy"
author = "the cocalcproxy authors"
copyright = "2026, the cocalcproxy authors"  # noqa: A001
release = "0.1.0"

extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build", "systemd"]
highlight_language = "none"
nitpicky = True

html_theme = "alabaster"
html_title = "cocalcproxy"
html_static_path: list[str] = []
