"""``python -m iscl_hw``."""

from __future__ import annotations

import sys

from iscl_hw.cli import main

sys.exit(main())
