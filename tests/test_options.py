"""The twistd options: defaults from the contract, environment fallbacks, refusals."""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial import unittest

from cocalcproxy.handlers.backends import DEFAULT_DENY
from cocalcproxy.ops import options as options_module
from cocalcproxy.ops.options import Options, default_database_url, default_state_dir


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


class OIDCOptionsTests(unittest.TestCase):
    def parse(self, *args: str) -> Options:
        parsed = Options()
        parsed.parseOptions(list(args))
        return parsed

    def secret(self, text: str = "the-secret\n") -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def oidc(self, issuer: str = "https://id.example.org", *extra: str) -> list[str]:
        return ["--oidc-issuer", issuer, "--oidc-client-id", "proxy",
                "--oidc-client-secret-file", self.secret(), *extra]  # fmt: skip

    def test_off_by_default_and_password_login_on(self) -> None:
        parsed = self.parse()
        self.assertIsNone(parsed["oidc"])
        self.assertEqual(parsed["password-login"], "on")
        self.assertFalse(parsed["identity-assertion"])

    def test_settings(self) -> None:
        domains = ["--oidc-allowed-domains", "Example.org, @uni.example"]
        issuer = "https://id.example.org/realms/x"
        parsed = self.parse(*self.oidc(issuer, *domains, "--password-login", "off"))
        settings = parsed["oidc"]
        self.assertEqual(settings.issuer, "https://id.example.org/realms/x")
        self.assertEqual(settings.with_secret().client_secret, "the-secret")
        self.assertNotIn("the-secret", repr(settings.with_secret()))
        self.assertEqual(settings.name, "id.example.org")
        self.assertEqual(settings.username_claim, "preferred_username")
        self.assertEqual(settings.allowed_domains, ("example.org", "uni.example"))
        self.assertEqual(parsed["password-login"], "off")
        self.assertEqual(self.parse(*self.oidc("http://127.0.0.1:9000"))["oidc"].name, "127.0.0.1")

    def test_refusals(self) -> None:
        for args, message in [
            (["--oidc-issuer", "https://id.example.org"], "go together"),
            (["--oidc-name", "X"], "needs --oidc-issuer"),
            (self.oidc("http://id.example.org"), "https URL"),
            (self.oidc("https://id.example.org/?x=1"), "without query"),
            (self.oidc("id.example.org"), "without query"),
            (["--password-login", "maybe"], "on or off"),
            (self.oidc("https://id.example.org", "--oidc-allowed-domains", "a b,"), "domains"),
        ]:
            with self.assertRaisesRegex(usage.UsageError, message):
                self.parse(*args)
        for path, message in (("/nonexistent/secret", "cannot read"), (self.secret("\n"), "one")):
            base = ["--oidc-issuer", "https://i.example", "--oidc-client-id", "p"]
            settings = self.parse(*base, "--oidc-client-secret-file", path)["oidc"]
            with self.assertRaisesRegex(ValueError, message):
                settings.with_secret()


class PortOptionsTests(unittest.TestCase):
    """--default-ports and --deny-ports (issue 16): parsed once into PortSets, clear errors."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--state-dir", "/tmp/unused", *argv])
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertIsNone(options["default-ports"], "auto")
        self.assertEqual(options["deny-ports"], DEFAULT_DENY)
        for port in (22, 2375, 3306, 5432, 6379, 10250, 11211, 27017):
            self.assertIn(port, options["deny-ports"])
        for port in (80, 443, 3000, 5000, 8000, 8080, 8888, 9000):
            self.assertNotIn(port, options["deny-ports"])

    def test_lists(self) -> None:
        options = self.parse("--default-ports", "8888,8000-8099", "--deny-ports", "none")
        self.assertEqual(str(options["default-ports"]), "8000-8099,8888")
        self.assertFalse(options["deny-ports"])
        self.assertEqual(self.parse("--default-ports", "AUTO")["default-ports"], None)
        self.assertEqual(str(self.parse("--default-ports", "all")["default-ports"]), "1-65535")

    def test_errors_name_the_option(self) -> None:
        for argv, message in (
            (("--default-ports", "0"), "--default-ports '0': invalid port list item"),
            (("--deny-ports", "99999"), "--deny-ports '99999': invalid port"),
            (("--deny-ports", "9-1"), "--deny-ports '9-1': invalid range"),
        ):
            with self.assertRaisesRegex(usage.UsageError, message):
                self.parse(*argv)
