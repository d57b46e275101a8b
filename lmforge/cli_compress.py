"""`lmforge compress quantize|prune`: a trained model in, a smaller model directory out. Each verb's
arguments and call are in its own module (cli_quantize.py, cli_prune.py); the work is in
lmforge/compress/."""

from __future__ import annotations

import argparse

from lmforge.cli_prune import add_prune_parser
from lmforge.cli_quantize import add_quantize_parser

__all__ = ["add_compress_command"]


def add_compress_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="quantize or prune a run, checkpoint or HF directory into a new model dir")
    csub = p.add_subparsers(dest="compress_command", required=True)
    add_quantize_parser(csub)
    add_prune_parser(csub)
