"""The asyncio event loop iscl's commands run on.

uvloop (the ``fast`` extra: ``pip install 'iscl[fast]'``) when it is
installed, else asyncio's own loop.  The environment variable
``ISCL_EVENT_LOOP`` chooses: ``auto`` (the default), ``uvloop`` (an error
when it is not installed) or ``asyncio``.  The library's coroutines run on
any loop; this only decides the loop of :func:`run`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from iscl_hw.errors import ConfigError

__all__ = ["ENV", "loop_factory", "loop_name", "run"]

log = logging.getLogger(__name__)

ENV = "ISCL_EVENT_LOOP"
_CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _choice() -> str:
    given = os.environ.get(ENV, "auto")
    choice = given.strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError(f"{ENV}={given!r} is not one of {', '.join(_CHOICES)}")
    return choice


def loop_factory() -> LoopFactory | None:
    """The factory of the chosen loop; None for asyncio's own."""
    choice = _choice()
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                f"{ENV}=uvloop, but uvloop is not installed (pip install 'iscl[fast]')"
            ) from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop :func:`run` would use."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the chosen kind, as
    :func:`asyncio.run` does."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()
        raise
    log.debug("event loop: %s", "asyncio" if factory is None else "uvloop")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
