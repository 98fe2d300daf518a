"""``python -m operators``: the application with MONAI Deploy's command line.

::

    python -m operators -i INPUT -o OUTPUT [-m MODEL ...] [-c CONFIG] [-q QUESTION ...] [-v]

As in MONAI Deploy apps, ``-i``/``-o``/``-m`` default to the environment
variables ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH`` /
``HOLOSCAN_MODEL_PATH`` (then ``input`` / ``output``; the model defaults to the
settings' model). ``-m`` takes a model name or folder and may be repeated
(several models, each on the series in its own scope). Errors print one line
and exit with status 2; a study no model reads prints
``tomoscribe: skipped: <reason>`` and exits 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tomoscribe.cli import execute_run


def main(argv: Sequence[str] | None = None) -> int:
    """Parse MONAI Deploy style arguments and run the application once."""
    parser = argparse.ArgumentParser(
        prog="python -m operators",
        description="tomoscribe as a MONAI Deploy application: one study in, SR + SEG out.",
    )
    parser.add_argument("-i", "--input", type=Path,
                        default=Path(os.environ.get("HOLOSCAN_INPUT_PATH") or "input"),
                        help="input folder or file (default: $HOLOSCAN_INPUT_PATH or 'input')")
    parser.add_argument("-o", "--output", type=Path,
                        default=Path(os.environ.get("HOLOSCAN_OUTPUT_PATH") or "output"),
                        help="output folder (default: $HOLOSCAN_OUTPUT_PATH or 'output')")
    model_env = os.environ.get("HOLOSCAN_MODEL_PATH")
    parser.add_argument("-m", "--model", action="append",
                        help="model name or folder, repeatable (default: $HOLOSCAN_MODEL_PATH "
                        "or the settings' model)")
    parser.add_argument("-c", "--config", type=Path,
                        help="settings file in app.yaml format (default: built-in settings)")
    parser.add_argument("-q", "--question", action="append",
                        help="a question the report must answer (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print why the series was chosen, and timings")
    args = parser.parse_args(argv)
    models = args.model or ([Path(model_env)] if model_env else None)
    return execute_run(args.input, args.output, models, args.question or (), args.config,
                       args.verbose)


if __name__ == "__main__":
    sys.exit(main())
