"""iscl: an engine for ISCL, the MEDIS-DC Integrated Secure Communication Layer."""

from __future__ import annotations

__version__ = "0.1.0"
