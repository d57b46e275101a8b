"""`lmforge compress quantize`: (being written in parallel work; registers no verb yet)."""

from __future__ import annotations

import argparse

__all__ = ["add_quantize_parser"]


def add_quantize_parser(csub: argparse._SubParsersAction) -> None:
    """Register `compress quantize` on the `compress` subparsers."""
