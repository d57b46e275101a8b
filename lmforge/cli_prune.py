"""`lmforge compress prune`: (being written in parallel work; registers no verb yet)."""

from __future__ import annotations

import argparse

__all__ = ["add_prune_parser"]


def add_prune_parser(csub: argparse._SubParsersAction) -> None:
    """Register `compress prune` on the `compress` subparsers."""
