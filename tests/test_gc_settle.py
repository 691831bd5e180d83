"""The proxy keeps its start-up heap out of the cyclic GC once it listens (ops.service.settle_gc),
only in the process twistd runs (and each worker), never in a test runner's process."""

from __future__ import annotations

import gc
import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from cocalcproxy.ops import service
from tests.support import options_for


class SettleGC(unittest.TestCase):
    def setUp(self) -> None:
        thresholds = gc.get_threshold()

        def restore() -> None:
            gc.unfreeze()
            gc.set_threshold(*thresholds)

        self.addCleanup(restore)

    def build(self) -> service.ProxyService:
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        return service.build_service(options_for(state_dir), reactor)

    @inlineCallbacks
    def test_frozen_once_listening(self):  # type: ignore[no-untyped-def]
        gc.unfreeze()
        proxy = self.build()
        proxy.settle_gc_when_listening = True
        proxy.startService()
        self.addCleanup(proxy.stopService)
        yield proxy.all_listening()
        self.assertGreater(gc.get_freeze_count(), 10_000)
        self.assertEqual(gc.get_threshold(), service.GC_THRESHOLDS)

    @inlineCallbacks
    def test_left_alone_unless_asked(self):  # type: ignore[no-untyped-def]
        gc.unfreeze()
        before = gc.get_threshold()
        proxy = self.build()
        proxy.startService()
        self.addCleanup(proxy.stopService)
        yield proxy.all_listening()
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), before)

    def test_the_twistd_plugin_asks(self) -> None:
        from cocalcproxy.ops.options import CommandLineOptions
        from twisted.plugins.cocalcproxy_plugin import serviceMaker

        options = CommandLineOptions()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
        # A bare ProxyService: a whole one would open a directory this test never closes.
        self.patch(service, "build_service", lambda o: service.ProxyService(reactor, o))
        proxy = serviceMaker.makeService(options)
        self.assertIsInstance(proxy, service.ProxyService)
        self.assertTrue(proxy.settle_gc_when_listening)
        self.assertTrue(proxy.exit_on_listen_failure)
        self.assertTrue(proxy.own_event_dispatch)
