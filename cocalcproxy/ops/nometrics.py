"""The metrics of a proxy started without ``--metrics``: every report is dropped.

Nobody can read the values without a ``/metrics`` listener, so keeping them would only cost:
prometheus_client and the metric objects in every process's memory (about 1.5 MiB), and a
counter increment and a histogram observation on every request. The methods are those of
:class:`cocalcproxy.ops.metrics.Metrics` that the rest of the proxy calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class NoMetrics:
    """Same reporting API as ``ops.metrics.Metrics``; does nothing."""

    def observe_request(self, facts: Any) -> None:
        pass

    def backend_failure(self, reason: str = "other") -> None:
        pass

    def signin_failure(self) -> None:
        pass

    def access_log_lines_lost(self, lines: int) -> None:
        pass

    def cache_hit(self, cache: str) -> None:
        pass

    def cache_miss(self, cache: str) -> None:
        pass

    def observe_directory_query(self, operation: str, seconds: float) -> None:
        pass

    def set_websocket_relays(self, count: Callable[[], int]) -> None:
        pass

    def set_directory_notifications(self, up: Callable[[], bool]) -> None:
        pass

    def set_directory_up(self, up: Callable[[], bool]) -> None:
        pass

    def set_in_flight(self, count: Callable[[], int]) -> None:
        pass

    def set_certificate_expiry(self, when: Callable[[], float]) -> None:
        pass

    def refresh(self) -> None:
        pass
