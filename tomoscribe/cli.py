"""The ``tomoscribe`` command.

::

    tomoscribe run -i INPUT_DIR -o OUTPUT_DIR [-m MODEL ...] [-q QUESTION ...] [-c CONFIG] [-v]
    tomoscribe questions [-m MODEL]
    tomoscribe version

``-m`` takes a packaged model's name (``default``, ``head-mr``) or a model
folder; repeated, it runs several models, each on the series in its own scope
(:func:`operators.app.run_app`), and the study is skipped only when none of
them reads it.

``questions`` lists the questions a model answers from its report, in each
wording it recognises (what to write in ``-q`` or the plugin's standing
``Questions``).

``run`` prints the written files and the report, and exits with status 0. On a
:class:`~tomoscribe.errors.TomoscribeError` it prints exactly one line,
``tomoscribe: error: <reason>``, on stderr and exits with status 2, leaving no
output file. A study the model does not read (not CT of the chest and abdomen
for the shipped model: :class:`~tomoscribe.errors.OutOfScopeError`) is not an
error: one line ``tomoscribe: skipped: <reason>`` on stderr, exit status 3, no
output file, so a batch script can tell the two apart. An unexpected internal
failure exits with status 1. Heavy modules (torch, holoscan) are imported only
by the command that needs them, so ``tomoscribe --help`` is fast.

A new subcommand is one function that adds its parser and sets ``handler``
(see :data:`SUBCOMMANDS`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from tomoscribe import __version__
from tomoscribe.domain import Domain
from tomoscribe.scope import ModelArg

PROG = "tomoscribe"
#: exit status for a user-facing error (bad input, bad settings, no model...)
EXIT_ERROR = 2
#: exit status for an unexpected internal failure
EXIT_INTERNAL = 1
#: exit status for a study the model does not read (outside its scope): nothing written
EXIT_SKIPPED = 3


def error_line(reason: object, stream: TextIO | None = None, kind: str = "error") -> None:
    """Print ``tomoscribe: <kind>: <reason>`` as one line (``kind``: error or skipped)."""
    text = " ".join(str(reason).split()) or "unknown error"
    print(f"{PROG}: {kind}: {text}", file=stream or sys.stderr, flush=True)


def execute_run(
    input_dir: Path,
    output_dir: Path,
    model_dir: ModelArg = None,
    questions: Sequence[str] = (),
    config: Path | None = None,
    verbose: bool = False,
) -> int:
    """Run the application on one study and report like the CLI; returns the exit status.

    Shared by ``tomoscribe run`` and ``python -m operators``.

    Args:
        input_dir: the study's folder or file.
        output_dir: folder for the outputs.
        model_dir: a model name or folder, or a list of them (``None`` or
            empty: the settings' models); see :func:`operators.app.run_app`.
        questions: questions to answer (empty: the settings' standing questions).
        config: a settings file in ``app.yaml`` format.
        verbose: also print the selection explanation and timings.

    Returns:
        0, :data:`EXIT_ERROR`, :data:`EXIT_SKIPPED`, :data:`EXIT_INTERNAL` or 130
        (interrupted).
    """
    from tomoscribe.errors import OutOfScopeError, TomoscribeError

    try:
        from operators.app import run_app

        result = run_app(
            input_dir, output_dir, model_dir=model_dir, questions=questions, config_path=config
        )
    except OutOfScopeError as exc:  # the model does not read this study: not an error
        error_line(exc, kind="skipped")
        return EXIT_SKIPPED
    except TomoscribeError as exc:
        error_line(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except Exception as exc:  # a bug, not bad input: one line unless -v asks for more
        if verbose:
            import traceback

            traceback.print_exc()
        error_line(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_INTERNAL

    out = sys.stdout
    if verbose:
        print("selection:", file=out)
        for line in result.explanation:
            print(f"  {line}", file=out)
        timings = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
        print(f"timings: {timings}", file=out)
    for label, reason in result.skipped:  # several models: one had nothing to read
        print(f"{label}: skipped: {reason}", file=out)
    for path in result.written:
        print(f"wrote {path}", file=out)
    print(file=out)
    print(result.report_text, file=out)
    slices = result.answer_slices or [()] * len(result.answers)
    for (question, answer), keys in zip(result.answers, slices, strict=False):
        print(f"Q: {question}\nA: {answer}", file=out)
        if keys:  # 1-based positions along the slice normal, as a viewer counts them
            print(f"   key images: {', '.join(str(k + 1) for k in keys)}", file=out)
    out.flush()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return execute_run(
        args.input,
        args.output,
        model_dir=args.model or None,
        questions=args.question or (),
        config=args.config,
        verbose=args.verbose,
    )


def questions_text(domain: Domain) -> str:
    """What :func:`_cmd_questions` prints for a model of ``domain``."""
    from tomoscribe.model.text import (
        NEGATIONS,
        PARAPHRASES,
        QUESTION_TEMPLATES,
        REFER_PARAPHRASES,
        REFER_TEMPLATES,
    )

    lines = [f"Questions a model of {domain.description} answers from its report, in the "
             "templates' words (first) or any other listed:"]
    for group, other, opposite in ((QUESTION_TEMPLATES, PARAPHRASES, NEGATIONS),
                                   (REFER_TEMPLATES, REFER_PARAPHRASES, {})):
        if group is REFER_TEMPLATES:
            lines.append("Requests answered with a mask (models with a <seg> token):")
        for template in group:
            lines.append(f"  {template}")
            also = [p for p, t in other.items() if t == template]
            if also:
                lines.append(f"      also: {' | '.join(also)}")
            inverse = [p for p, t in opposite.items() if t == template]
            if inverse:
                lines.append(f"      the opposite: {' | '.join(inverse)}")
    kinds = "; ".join(f"{k} ({', '.join(s for s in domain.sites if k in domain.kinds[s])})"
                      for k in domain.lesion_kinds)
    more = [s for s in domain.structures[1:] if s not in domain.sites]
    organs = ", ".join(domain.sites) + (
        f" (\"segment the {{organ}} .\": also {', '.join(more)})" if more else "")
    lines += [
        f"{{organ}}: {organs}",
        f"{{kind}}: {kinds}",
        "{kinds}: the kind's plural, where the site holds one kind",
        "Case, articles, plurals and the closing mark do not matter. Any other question "
        "goes to the language model as typed, which answers best in the templates' words.",
    ]
    return "\n".join(lines)


def _cmd_questions(args: argparse.Namespace) -> int:
    from tomoscribe.errors import TomoscribeError
    from tomoscribe.scope import read_model_domain, resolve_model

    try:
        folder = resolve_model(args.model)
    except TomoscribeError as exc:
        error_line(exc)
        return EXIT_ERROR
    domain = read_model_domain(folder)
    if domain is None:
        error_line(f"cannot read the domain of the model in {folder}: its config.json is "
                   "missing, unreadable or names no known domain")
        return EXIT_ERROR
    print(questions_text(domain))
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"{PROG} {__version__}")
    return 0


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="draft the SR and SEG of one study folder",
        description="Run the MONAI Deploy application on one study: choose a series, "
        "encode it, write the report as DICOM SR and the segmentation as DICOM SEG.",
        epilog=f"exit status: 0 written; {EXIT_ERROR} error (one line on stderr, nothing "
        f"written); {EXIT_SKIPPED} skipped: the model does not read this study (one line "
        f"'{PROG}: skipped: <reason>' on stderr, nothing written); {EXIT_INTERNAL} internal "
        "error",
    )
    p.add_argument("-i", "--input", type=Path, required=True, metavar="INPUT_DIR",
                   help="study folder (searched recursively) or DICOM file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT_DIR",
                   help="folder for the SR and SEG files (created if missing)")
    p.add_argument("-m", "--model", action="append", metavar="MODEL",
                   help="a packaged model's name (default, or another tomoscribe/weights-<name>)"
                   " or a model folder (config.json + model.pt); repeat it to run several "
                   "models, each on the series in its own scope; default: the settings' model")
    p.add_argument("-q", "--question", action="append", metavar="QUESTION",
                   help="a question the report must answer (repeatable); replaces the "
                   "settings' standing questions")
    p.add_argument("-c", "--config", type=Path, metavar="CONFIG",
                   help="settings file in app.yaml format; default: built-in settings")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print why the series was chosen, and timings")
    p.set_defaults(handler=_cmd_run)


def _add_questions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("questions", help="list the questions a model answers from its report",
                       description="The questions a model answers from its report, in every "
                       "wording it recognises: what to write in -q or in the plugin's "
                       "standing Questions.")
    p.add_argument("-m", "--model", metavar="MODEL",
                   help="a packaged model's name or a model folder; default: the default model")
    p.set_defaults(handler=_cmd_questions)


def _add_version(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(handler=_cmd_version)


#: each adds one subcommand (its parser, with ``handler`` set) to the CLI
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_run,
    _add_questions,
    _add_version,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tomoscribe`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Draft radiology reports (DICOM SR + SEG) from CT/MR studies.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tomoscribe`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
