"""Stage train (placeholder: its issue replaces this module)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("stage train is not implemented yet")
