from __future__ import annotations

import sys

from tradebus.cli import main

sys.exit(main())
