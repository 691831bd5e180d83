"""The twistd options: defaults from the contract, environment fallbacks, refusals."""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial import unittest

from cocalcproxy import options as options_module
from cocalcproxy.options import Options, default_database_url, default_state_dir


class OptionsTests(unittest.TestCase):
    def parse(self, *args: str) -> Options:
        parsed = Options()
        parsed.parseOptions(list(args))
        return parsed

    def test_contract_defaults(self) -> None:
        self.patch(options_module, "default_state_dir", lambda: "cocalcproxy-state")
        parsed = self.parse()
        self.assertEqual(parsed["listen"], ["tcp:8443"])
        self.assertEqual(parsed["state-dir"], "cocalcproxy-state")
        self.assertEqual(
            parsed["database"],
            "sqlite:///" + os.path.join(os.getcwd(), "cocalcproxy-state", "directory.sqlite3"),
        )
        self.assertEqual(parsed["hostname"], "localhost")
        self.assertIsNone(parsed["tls-cert"])
        self.assertIsNone(parsed["redirect-http"])
        self.assertIsNone(parsed["metrics"])
        self.assertIsNone(parsed["project-domain"])
        self.assertEqual(parsed["max-body-size"], 1024**3)
        self.assertEqual(parsed["backend-connect-timeout"], 10.0)

    def test_state_dir_environment(self) -> None:
        self.assertEqual(default_state_dir({}), "cocalcproxy-state")
        self.assertEqual(default_state_dir({"STATE_DIRECTORY": "/var/lib/cp"}), "/var/lib/cp")
        self.assertEqual(
            default_state_dir({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}), "/var/lib/a"
        )
        self.assertEqual(
            default_state_dir({"STATE_DIRECTORY": "/a", "COCALCPROXY_STATE_DIR": "/b"}), "/b"
        )
        self.assertEqual(default_database_url("/x/y"), "sqlite:////x/y/directory.sqlite3")

    def test_listen_repeatable(self) -> None:
        parsed = self.parse("--listen", "tcp:1", "--listen", "unix:/tmp/s")
        self.assertEqual(parsed["listen"], ["tcp:1", "unix:/tmp/s"])

    def test_sizes_and_numbers(self) -> None:
        self.assertEqual(self.parse("--max-body-size", "10M")["max-body-size"], 10 * 1024**2)
        self.assertEqual(self.parse("--max-body-size", "2GiB")["max-body-size"], 2 * 1024**3)
        self.assertEqual(self.parse("--max-body-size", "512")["max-body-size"], 512)
        for bad in ("0", "-1", "lots", "1X"):
            with self.assertRaises(usage.UsageError, msg=bad):
                self.parse("--max-body-size", bad)
        with self.assertRaises(usage.UsageError):
            self.parse("--backend-connect-timeout", "0")
        with self.assertRaises(usage.UsageError):
            self.parse("--hsts-max-age", "-5")

    def test_key_needs_certificate(self) -> None:
        with self.assertRaises(usage.UsageError):
            self.parse("--tls-key", "/k.pem")

    def test_project_domain_normalised(self) -> None:
        self.assertEqual(
            self.parse("--project-domain", "Projects.Example.ORG.")["project-domain"],
            "projects.example.org",
        )
        for bad in [
            "a/b",
            "a;b.example",
            "a b.example",
            "x.example; form-action *",
            "a..b",
            "-a.b",
        ]:
            with self.assertRaises(usage.UsageError, msg=bad):
                self.parse("--project-domain", bad)
        self.assertEqual(
            self.parse("--project-domain", "xn--bcher-kva.example")["project-domain"],
            "xn--bcher-kva.example",
        )
