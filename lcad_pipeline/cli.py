"""The ``lcad`` command line: one entry point whose subcommands live in their own modules.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).
Modules are imported only when their subcommand runs, so ``lcad --help`` stays fast and a missing
optional dependency of one subcommand never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "colorize": ("lcad_pipeline.cli_colorize", "colourise images or folders of images"),
    "convert": ("lcad_pipeline.convert", "convert a released L-CAD checkpoint into a pipeline folder"),
    "push": ("lcad_pipeline.hub", "upload a pipeline folder to the Hugging Face Hub"),
    "evaluate": ("lcad_pipeline.evaluation", "score colourised images against ground truth"),
    "demo": ("lcad_pipeline.cli_demo", "start the web demo"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcad", description="L-CAD: language-based colourisation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"lcad {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
