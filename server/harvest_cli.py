"""`modeldeploy harvest SOURCE --slug-root DIR`: the pod's init container.

Resolves and fetches the model, fills its slug directory and prints the harvest
result as JSON on stdout (logs and download progress go to stderr, so the JSON
can be piped). Bad input (unknown scheme, missing path, ambiguous --quant) raises
a UserInputError, which the `modeldeploy` entry point turns into exit code 2
and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from modeldeploy.server import logs
from modeldeploy.server.contract import default_slug_root
from modeldeploy.server.harvest import harvest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="model source (path or URI)")
    parser.add_argument(
        "--slug-root",
        default=None,
        help=f"where slug directories go (default {default_slug_root()})",
    )
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache (hf:// sources)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (hf:// sources)")
    parser.add_argument("--quant", default=None, help="pick the .gguf whose name contains this")
    parser.add_argument("--log-level", default="INFO", help="level of the JSON logs on stderr")


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level.upper())
    result = harvest(
        args.source,
        args.slug_root or default_slug_root(),
        cache_dir=args.cache_dir,
        revision=args.revision,
        quant=args.quant,
    )
    json.dump(result.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
