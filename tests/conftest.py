"""Shared test hygiene.

A test that runs ``iscl ... --config FILE`` in process lets the site's
``[logging]`` section reconfigure the root and audit loggers, with handlers
on the streams pytest captured for that test.  Left in place, later tests
would log through closed streams (a "Logging error" per record, slow enough
to make the PC/SC bridges miss their deadlines), so every test gets the
logging it started with back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

_WATCHED = ("", "iscl.audit")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = {}
    for name in _WATCHED:
        logger = logging.getLogger(name)
        saved[name] = (logger.level, list(logger.handlers), logger.propagate)
    yield
    for name, (level, handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            ours = not type(handler).__module__.startswith("_pytest")
            if handler not in handlers and ours:
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(level)
        logger.propagate = propagate
