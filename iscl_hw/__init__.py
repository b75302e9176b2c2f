"""iscl: an engine for ISCL, the MEDIS-DC Integrated Secure Communication Layer.

The blocking API is re-exported here; see :mod:`iscl_hw.aio` for asyncio and
:mod:`iscl_hw.core` for the I/O-free protocol core.
"""

from __future__ import annotations

from iscl_hw.endpoint import Timeouts
from iscl_hw.settings import Settings
from iscl_hw.sync import Channel, accept, connect

__all__ = ["Channel", "Settings", "Timeouts", "__version__", "accept", "connect"]

__version__ = "0.1.0"
