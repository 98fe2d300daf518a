"""Shared pytest setup (keep minimal).

``plugin/`` holds top-level modules (``jobs``, ``events``...), imported the
way Orthanc's python plugin imports them: by putting ``plugin/`` on ``sys.path``.
"""

import sys
from pathlib import Path

_PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "plugin")
if _PLUGIN_DIR not in sys.path:
    sys.path.insert(0, _PLUGIN_DIR)
