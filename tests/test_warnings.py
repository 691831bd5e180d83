"""The suite fails on deprecation warnings from our own code, under pytest and trial alike."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.trial import unittest

import cocalcproxy
from cocalcproxy.http import site
from tests import install_warning_filters


@contextmanager
def suite_filters() -> Iterator[list[warnings.WarningMessage]]:
    """Only the suite's own filters (each runner wraps a test in filters of its own)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        install_warning_filters()
        yield caught


def emit(module: str | None, message: str = "old API", filename: str = site.__file__) -> None:
    warnings.warn_explicit(message, DeprecationWarning, filename=filename, lineno=1, module=module)


class OwnDeprecationsAreErrors(unittest.SynchronousTestCase):
    def test_a_deprecation_in_the_package_raises(self) -> None:
        with suite_filters(), self.assertRaises(DeprecationWarning):
            emit("cocalcproxy.http.site")

    def test_a_deprecation_in_the_tests_raises(self) -> None:
        with suite_filters(), self.assertRaises(DeprecationWarning):
            emit("tests.support")

    def test_a_deprecation_re_emitted_by_trial_raises(self) -> None:
        # trial re-emits a test's warnings with the module taken from the file name.
        path = os.path.join(os.path.dirname(os.path.abspath(cocalcproxy.__file__)), "site")
        with suite_filters(), self.assertRaises(DeprecationWarning):
            emit(path)

    def test_a_library_deprecation_about_our_call_raises(self) -> None:
        with suite_filters(), self.assertRaises(DeprecationWarning):
            emit("OpenSSL.SSL", "Passing pyOpenSSL X509 objects is deprecated.", "SSL.py")

    def test_other_libraries_deprecations_stay_warnings(self) -> None:
        with suite_filters() as caught:
            emit("somelib", "elsewhere", "/usr/lib/python3/somelib.py")
        self.assertEqual(len(caught), 1)
