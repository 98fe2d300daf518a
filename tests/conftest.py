"""Shared pytest setup (keep minimal).

``plugin/`` holds top-level modules (``jobs``, ``events``...), imported the
way Orthanc's python plugin imports them: by putting ``plugin/`` on ``sys.path``.
``benchmarks/`` scripts (``encoders``...) are imported the same way.
"""

import sys
from pathlib import Path

for _folder in ("plugin", "benchmarks"):
    _path = str(Path(__file__).resolve().parent.parent / _folder)
    if _path not in sys.path:
        sys.path.insert(0, _path)
