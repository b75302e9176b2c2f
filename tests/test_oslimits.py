"""Raising the open-file limit before a server starts (``iscl_hw.oslimits``),
in a child process whose limits the test sets."""

from __future__ import annotations

import resource
import subprocess
import sys

CHILD = """
import logging, resource, sys
from iscl_hw.oslimits import ensure_open_files
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
soft = ensure_open_files(int(sys.argv[1]), 2, "gateway")
assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
print(soft)
"""


def run_child(
    soft: int, hard: int, connections: int
) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.run(
        [sys.executable, "-c", CHILD, str(connections)],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def test_soft_limit_is_raised_within_the_hard_one() -> None:
    hard = hard_limit()
    raised = min(256 * 2 + 64, hard)
    done = run_child(128, hard, 256)
    assert int(done.stdout) == raised
    assert f"open-file limit raised from 128 to {raised}" in done.stderr
    assert ("WARNING" in done.stderr) == (raised < 576)


def test_a_limit_that_stays_too_low_is_said_once_up_front() -> None:
    done = run_child(128, 128, 256)
    assert int(done.stdout) == 128
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1
    assert "open-file limit is 128, but 256 connections need about 576" in warnings[0]
    assert "LimitNOFILE" in warnings[0]


def test_enough_files_changes_nothing() -> None:
    done = run_child(4096, max(4096, hard_limit()), 256)
    assert int(done.stdout) == 4096
    assert done.stderr == ""
