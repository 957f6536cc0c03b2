"""What every command shares: the Typer app, the stderr console, option
types and checks, and ``run_command`` (charnn's errors -> ``Error: ...``)."""

from __future__ import annotations

import math
import os
import sys
from enum import Enum
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="charnn",
    help="Train character-level recurrent language models on your own text, and generate from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err = Console(stderr=True, highlight=False, soft_wrap=True)


class Cell(str, Enum):
    lstm = "lstm"
    gru = "gru"
    rnn = "rnn"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Unknown(str, Enum):
    error = "error"
    skip = "skip"


def version_callback(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"charnn {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """charnn: a model of your text, on your laptop, in minutes."""


def run_command(body: Callable[[], Any]) -> Any:
    """Turn charnn's errors into ``Error: ...`` + exit 1, Ctrl-C into exit 130,
    and a closed pipe into a quiet exit. No traceback reaches the user."""
    from ..errors import CharnnError

    try:
        return body()
    except CharnnError as e:
        from ..train import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            err.print(f"[yellow]Interrupted.[/] {e}", markup=True)
            raise typer.Exit(130)
        err.print(f"Error: {e}", markup=False)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print("Interrupted.", markup=False)
        raise typer.Exit(130)
    except BrokenPipeError:
        _quiet_broken_pipe()
        raise typer.Exit(0)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as e:  # a bug: say so plainly; CHARNN_DEBUG=1 shows the traceback
        if os.environ.get("CHARNN_DEBUG"):
            raise
        err.print(f"Error: unexpected {type(e).__name__}: {e}. This is a bug in charnn; "
                  "rerun with CHARNN_DEBUG=1 for the traceback and report it.", markup=False)
        raise typer.Exit(1)


def _quiet_broken_pipe() -> None:
    # The reader went away (`charnn sample ... | head`): point stdout at
    # /dev/null so the interpreter's final flush does not complain.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def parse_time_limit(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter("is empty; write it like 30s, 5m, 2h or 1h30m")
    from ..errors import ConfigError
    from ..train import parse_duration

    try:
        parse_duration(value)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    return value


def positive(value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be a positive number, got {value}")
    return value


def unit_interval(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value


def fmt_loss(loss: float) -> str:
    if loss is None or not math.isfinite(loss):
        return "n/a"
    return f"{loss:.4f} nats/char ({loss / math.log(2):.3f} bits/char)"


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

