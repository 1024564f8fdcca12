"""Where the blocklist data of the bench and of the tests that use it lies:
../shared/data/blocklists beside the repo (CI lays a copy there), or
wherever XDPGUARD_BLOCKLISTS points (a clone made elsewhere)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKLISTS = Path(os.environ.get("XDPGUARD_BLOCKLISTS") or REPO.parent / "shared" / "data" / "blocklists")
