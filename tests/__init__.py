"""The test suite. Importing it turns deprecation warnings caused by our own code into errors,
under pytest (which also reads ``filterwarnings`` in pyproject.toml) and under trial (which
re-emits each test's warnings after it and reports an error when one raises)."""

import os
import re
import warnings

import cocalcproxy

_OURS = [os.path.dirname(os.path.abspath(cocalcproxy.__file__)), os.path.dirname(__file__)]
# A warning's module is its dotted name (pytest, plain warnings) or, when trial re-emits it, its
# file name without ".py": match both, for the package and for the tests.
OWN_MODULES = r"(?:cocalcproxy|tests)(?:\..*)?\Z|" + "|".join(re.escape(d) + r"/" for d in _OURS)
# Deprecations raised inside a library about how our code calls it (stacklevel points there).
OUR_CALLS = ("Passing pyOpenSSL", "Passing HostnameEndpoint a reactor")


def install_warning_filters() -> None:
    for category in (DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("error", category=category, module=OWN_MODULES)
        for message in OUR_CALLS:
            warnings.filterwarnings("error", message=message, category=category)


install_warning_filters()
