"""Pure rules of shared ports: the sharing policy, routing of the share landing path, the share
cookie's binding, and how shared traffic is counted."""

from __future__ import annotations

from twisted.trial import unittest

from cocalcproxy.directory.hashing import token_hash
from cocalcproxy.directory.operations import Forbidden, SharingPolicy
from cocalcproxy.guard.shares import cookie_value, secret_matches
from cocalcproxy.http import routing
from cocalcproxy.ops.accesslog import RequestFacts, format_line
from cocalcproxy.ops.metrics import Metrics

PID = "7d4c2b1a-0f9e-4d8c-b7a6-5e4d3c2b1a09"


class PolicyTests(unittest.TestCase):
    def test_what_each_level_allows(self) -> None:
        for allow, allowed in (
            ("none", {"private"}),
            ("link", {"private", "link"}),
            ("public", {"private", "link", "public"}),
        ):
            policy = SharingPolicy(allow, "proj.test")
            for visibility in ("private", "link", "public"):
                self.assertEqual(policy.allows(visibility), visibility in allowed)
                if visibility in allowed:
                    policy.check(visibility)
                else:
                    self.assertRaises(Forbidden, policy.check, visibility)

    def test_nothing_shared_without_project_domain(self) -> None:
        policy = SharingPolicy("public", None)
        self.assertFalse(policy.allows("public"))
        with self.assertRaisesRegex(Forbidden, "--project-domain"):
            policy.check("link")
        policy.check("private")


class RoutingTests(unittest.TestCase):
    def test_share_landing_only_on_port_hosts(self) -> None:
        port_host = f"{PID}-8000.proj.test".encode()
        self.assertEqual(
            routing.parse(port_host, b"/.cocalcproxy/share?s=x", "proj.test", "localhost"),
            routing.OwnPage("share_landing", f"{PID}-8000".encode()),
        )
        raw = routing.parse(f"{PID}-raw.proj.test".encode(), b"/.cocalcproxy/share", "proj.test")
        self.assertNotEqual(getattr(raw, "name", None), "share_landing")
        main = routing.parse(b"localhost", b"/.cocalcproxy/share", "proj.test", "localhost")
        self.assertIsInstance(main, routing.NotFound)


class CookieTests(unittest.TestCase):
    def test_bound_to_host_link_and_key(self) -> None:
        key = b"k" * 32
        digest = token_hash("secret")
        value = cookie_value(key, f"{PID}-8000", digest)
        self.assertNotEqual(value, cookie_value(key, f"{PID}-8001", digest))
        self.assertNotEqual(value, cookie_value(key, f"{PID}-8000", token_hash("other")))
        self.assertNotEqual(value, cookie_value(b"j" * 32, f"{PID}-8000", digest))
        self.assertNotIn("secret", value)

    def test_secret_matches(self) -> None:
        digest = token_hash("s3cret")
        self.assertTrue(secret_matches("s3cret", digest))
        self.assertFalse(secret_matches("s3cre", digest))
        self.assertFalse(secret_matches("", digest))
        self.assertFalse(secret_matches("s3cret", None))
        self.assertFalse(secret_matches("x" * 600, token_hash("x" * 600)))


class AccountingTests(unittest.TestCase):
    def facts(self, share: str | None) -> RequestFacts:
        return RequestFacts(
            time=0.0, client="127.0.0.1", method="GET", host="h", path="/", has_query=False,
            status=200, completed=True, bytes_in=0, bytes_out=0, duration=0.0, account=None,
            project=PID, form="port", port=8000, share=share,
        )  # fmt: skip

    def test_metric_and_log_mark_shared_traffic(self) -> None:
        metrics = Metrics()
        metrics.observe_request(self.facts("public"))
        metrics.observe_request(self.facts("link"))
        metrics.observe_request(self.facts("link"))
        metrics.observe_request(self.facts(None))
        text = metrics.exposition().decode()
        self.assertIn('cocalcproxy_shared_requests_total{visibility="link"} 2.0', text)
        self.assertIn('cocalcproxy_shared_requests_total{visibility="public"} 1.0', text)
        self.assertIn('"share":"public"', format_line(self.facts("public")))
        self.assertNotIn("share", format_line(self.facts(None)))
