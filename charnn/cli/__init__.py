"""The command line: parse options, call the library, render with rich.

The only package that imports typer or rich: one module per command, sharing
``common``. torch is imported inside the command bodies so that ``charnn
--help`` is instant. Results go to stdout, progress and status to stderr.
"""

from __future__ import annotations

from .common import app, err, run_command
from . import train, sample, eval, info, inspect, serve, export  # noqa: E402,F401  (registers the commands, in this order)
from .progress import TrainReporter
from .sample import SAMPLE_DIVIDER

__all__ = ["app", "err", "run_command", "TrainReporter", "SAMPLE_DIVIDER"]
