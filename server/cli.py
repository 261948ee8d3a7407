"""The `modeldeploy` console script: one entry point, one sub-command per module.

Each sub-command lives in the module that does the work and exposes
`add_arguments(parser)` and `run(args) -> int`. Only the chosen sub-command's
module is imported, so `modeldeploy operator` works in the operator image where
torch is not installed, and `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from modeldeploy.server.errors import UserInputError

#: name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("modeldeploy.server.http.serve", "harvest, load and serve a model over HTTP"),
    "harvest": (
        "modeldeploy.server.harvest_cli",
        "fetch a model and fill its slug directory; print the result as JSON",
    ),
    "inspect": (
        "modeldeploy.server.formats.inspect",
        "print what a model file or directory is, as JSON",
    ),
    "operator": ("modeldeploy.operator.main", "run the Kubernetes operator"),
}

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _top_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="modeldeploy",
        description="Serve LLMs with PyTorch and run them on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command; map bad input to exit 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # prints usage/help and exits
        return EXIT_BAD_INPUT
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = _OneLineParser(prog=f"modeldeploy {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UserInputError as exc:
        print(f"modeldeploy {name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a failure of ours: keep the traceback in the log
        logging.getLogger("modeldeploy").exception("%s failed", name)
        print(f"modeldeploy {name}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
