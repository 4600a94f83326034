"""Helpers the refund-on-drop tests share: what reaches ``sys.unraisablehook``, refund recorders."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def capture_unraisable() -> Iterator[list[tuple[type[BaseException], str]]]:
    """Record what is reported through ``sys.unraisablehook`` instead of printing it."""
    reports: list[tuple[type[BaseException], str]] = []

    def hook(unraisable: Any) -> None:
        reports.append((unraisable.exc_type, str(unraisable.exc_value)))

    previous = sys.unraisablehook
    sys.unraisablehook = hook
    try:
        yield reports
    finally:
        sys.unraisablehook = previous


def recorder() -> tuple[list[int], Callable[[int], None]]:
    calls: list[int] = []
    return calls, calls.append
