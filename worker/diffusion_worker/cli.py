"""Command line: `serve` runs the HTTP server, `build-tiny-model` writes a tiny test pipeline."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from diffusion_worker.settings import add_settings_arguments, describe_settings_error, settings_from_namespace

log = logging.getLogger("diffusion_worker")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, subcommands included."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a diffusers pipeline over the OpenAI images API")
    add_settings_arguments(serve)
    tiny = commands.add_parser("build-tiny-model", help="write a tiny random-weight SD pipeline to DIR")
    tiny.add_argument("directory", type=Path, metavar="DIR")
    tiny.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "build-tiny-model":
        from diffusion_worker.tiny_model import build_tiny_pipeline

        build_tiny_pipeline(args.directory, seed=args.seed)
        print(f"wrote a tiny Stable Diffusion pipeline to {args.directory}")
        return 0
    try:
        settings = settings_from_namespace(args)
    except ValidationError as exc:
        print(f"error: invalid settings:\n{describe_settings_error(exc)}", file=sys.stderr)
        return 2
    from diffusion_worker.server import serve

    return serve(settings)
