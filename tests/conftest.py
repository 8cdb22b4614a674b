"""Shared pytest setup: make tests/spmd.py importable and give multi-rank tests their world sizes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
