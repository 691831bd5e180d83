"""SIGHUP to a running ``twistd -n cocalcproxy``: new connections see the new certificate, a
broken file is refused with a log line and the old certificate keeps serving."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from twisted.trial import unittest

from tests import tlsutil
from tests.processes import ProxyProcess, wait_for


class SighupTests(unittest.TestCase):
    def test_reload_on_sighup(self) -> None:
        state = self.mktemp()
        tls_dir = Path(self.mktemp()).absolute()
        cert, key, leaf, _ = tlsutil.write_pair(tls_dir, "first")
        proxy = ProxyProcess(state, "--tls-cert", str(cert), "--tls-key", str(key)).start()
        self.addCleanup(proxy.stop)
        proxy.wait_listening()
        self.assertEqual(tlsutil.peer_fingerprint(proxy.port), tlsutil.fingerprint(leaf))

        new_cert, new_key, new_leaf, _ = tlsutil.write_pair(tls_dir, "second")
        os.replace(new_cert, cert)
        os.replace(new_key, key)
        proxy.signal(signal.SIGHUP)
        wait_for(
            lambda: tlsutil.peer_fingerprint(proxy.port) == tlsutil.fingerprint(new_leaf),
            30,
            "the new certificate on a new connection",
        )

        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "TLS reload refused" in proxy.output(), 30, "the refusal in the log")
        self.assertEqual(tlsutil.peer_fingerprint(proxy.port), tlsutil.fingerprint(new_leaf))
        self.assertEqual(proxy.stop(), 0, proxy.output()[-3000:])

    def test_bad_certificate_at_start_is_a_clear_error(self) -> None:
        state = self.mktemp()
        bad = Path(self.mktemp()).absolute()
        bad.write_bytes(b"nonsense")
        proxy = ProxyProcess(state, "--tls-cert", str(bad)).start()
        assert proxy.process is not None
        code = proxy.process.wait(timeout=60)
        self.assertEqual(code, 1)
        self.assertIn("no PEM certificate found", proxy.output())
        self.assertNotIn("Traceback", proxy.output())
