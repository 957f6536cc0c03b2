"""What every command shares: the Typer app, the stderr console, option
types and checks, pluralisation, safe JSON, standard output that fails
cleanly, and ``run_command`` (charnn's errors -> ``Error: ...``).

Help texts follow one set of conventions (see ``HELP CONVENTIONS`` below) so
that every ``--help`` reads well at 80 columns.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import sys
from enum import Enum
from typing import Annotated, Any, Callable, Optional

import typer

try:  # typer >= 0.2x carries its own copy of click (and does not install click)
    from typer import _click as click
    from typer._click import utils as click_utils
except ImportError:  # older typer runs on the click package
    import click
    from click import utils as click_utils
from rich.console import Console

from ..errors import plural, safe_display  # noqa: F401  (plural: the commands import it from here)
from ..safe_files import json_safe
from typer.core import TyperCommand

# HELP CONVENTIONS (every command):
# - Plain click help formatting (``rich_markup_mode=None``): two columns, the
#   descriptions get ~48 of 80 columns, and square brackets in help texts are
#   shown as written (rich markup ate ``charnn[plot]``).
# - Every option that takes a value names it with a short upper-case
#   ``metavar`` (N, FILE, TEXT, SECONDS...) or its choices as ``[a|b|c]``; flags
#   show none.
# - Defaults appear in one style only, ``[default: X]`` at the end: generated
#   by click for fixed values; for a default that depends on something, the
#   help text ends with the same words written out (``[default: a random seed]``)
#   and the option says ``show_default=False``.
# - Bounds are checked by callbacks (``at_least``, ``between``) rather than
#   ``min=``/``max=``, whose ``x>=1`` notation would land in the help; a bound a
#   user could not guess is stated in words.
# - Units are stated: characters, steps, seconds; one sentence per option,
#   ending with a full stop.

class _StderrConsole(Console):
    """stderr whose reader may go away (``charnn train 2>&1 | head``, a killed
    ``tee``). rich's own answer to a broken pipe is to point stdout at
    /dev/null and raise SystemExit(1): a training run would stop there and
    lose its work. Here the rest of the messages are dropped instead, and the
    command goes on (training saves, sampling still writes its stdout)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


err = _StderrConsole(stderr=True, highlight=False, soft_wrap=True)


class Cell(str, Enum):
    lstm = "lstm"
    gru = "gru"
    rnn = "rnn"


class Size(str, Enum):
    auto = "auto"
    fixed = "fixed"


class Order(str, Enum):
    """How the trainer reads the text: chosen from the budget, shuffled blocks, each stream in order."""
    auto = "auto"
    shuffled = "shuffled"
    in_order = "in-order"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Unknown(str, Enum):
    error = "error"
    skip = "skip"


# -- option values -------------------------------------------------------------

_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
DEVICE_HELP = "Where to run: auto, cpu, cuda, cuda:N (GPU number N) or mps."


def parse_device(value: Optional[str]) -> Optional[str]:
    """``--device``: auto | cpu | cuda | cuda:N | mps, checked here (exit 2);
    whether that device exists is :func:`charnn.model.devices.resolve_device`'s job."""
    if value is None:
        return None
    name = value.strip().lower()
    if not _DEVICE_RE.fullmatch(name):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N (such as cuda:1) or mps")
    return name


def at_least(low: int | float) -> Callable[[Any], Any]:
    """A callback that refuses values below ``low`` (None passes)."""
    def check(value: Any) -> Any:
        if value is not None and not value >= low:
            raise typer.BadParameter(f"must be at least {low}, got {value}")
        return value
    return check


def between(low: int | float, high: int | float) -> Callable[[Any], Any]:
    """A callback that refuses values outside ``[low, high]`` (None passes)."""
    def check(value: Any) -> Any:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"must be between {low} and {high}, got {value}")
        return value
    return check


THREADS_HELP = ("CPU threads for torch.  [default: OMP_NUM_THREADS if set, else the idle cores, at most 4, "
                "shared among torchrun's ranks on this machine]")


def escape_text(text: str) -> str:
    """``text`` (from a checkpoint or a file name) with control and other
    unprintable characters as escapes, so none reaches the terminal raw."""
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


# -- JSON ------------------------------------------------------------------------

def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (no NaN, no Infinity) of ``value`` after :func:`json_safe`."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


# -- standard output ------------------------------------------------------------

class StdoutError(Exception):
    """Writing to standard output failed (closed, full, or a reader that left)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error

    @property
    def broken_pipe(self) -> bool:
        return isinstance(self.error, BrokenPipeError) or self.error.errno == errno.EPIPE


class _ClosedStdout(io.TextIOBase):
    """Stands in for standard output when the process started with it closed
    (``>&-``): every write fails with EBADF, so a command that has results to
    print says so instead of printing nowhere."""

    encoding = "utf-8"
    errors = "strict"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")

    def flush(self) -> None:
        pass


class StdoutWriter:
    """What the commands write their results through: ``sys.stdout`` (looked
    up on each call, so test runners can swap it), with characters the stream
    cannot encode (lone surrogates) written as backslash escapes, and any
    ``OSError`` raised as :class:`StdoutError`."""

    def _stream(self) -> Any:
        if sys.stdout is None:  # started with fd 1 closed and nothing put in its place
            raise StdoutError(OSError(errno.EBADF, "standard output is closed"))
        return sys.stdout

    def write(self, s: str) -> int:
        stream = self._stream()
        try:
            try:
                return stream.write(s)
            except UnicodeEncodeError:
                enc = getattr(stream, "encoding", None) or "utf-8"
                return stream.write(s.encode(enc, "backslashreplace").decode(enc))
        except OSError as e:
            raise StdoutError(e) from None

    def flush(self) -> None:
        stream = self._stream()
        try:
            stream.flush()
        except OSError as e:
            raise StdoutError(e) from None

    def isatty(self) -> bool:
        try:
            return bool(self._stream().isatty())
        except (StdoutError, OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stdout, name)


stdout = StdoutWriter()


def out_console() -> Console:
    """A rich console for results on standard output (through :data:`stdout`)."""
    return Console(file=stdout, highlight=False, soft_wrap=True)  # type: ignore[arg-type]


def _point_stdout_at_devnull() -> None:
    """Send fd 1 to /dev/null, so that what is still buffered (and the
    interpreter's last flush) goes nowhere instead of failing again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _stdout_failure(e: StdoutError) -> int:
    """Report a failed standard output; the exit code to use."""
    _point_stdout_at_devnull()
    if e.broken_pipe:  # the reader went away (`charnn sample | head`): like other Unix tools, quietly
        return 0
    if e.error.errno == errno.ENOSPC:
        why = "the disk is full"
    elif e.error.errno == errno.EBADF:
        why = "it is closed"
    else:
        why = e.error.strerror or str(e.error)
    if not _quiet_rank():
        try:
            err.print(f"Error: cannot write to standard output: {why}.", markup=False)
        except OSError:
            pass
    return 1


def _quiet_rank() -> bool:
    """Under torchrun every process runs the command; only rank 0 speaks. Only
    a valid torchrun setting (WORLD_SIZE > 1, 0 < RANK < WORLD_SIZE) quiets a
    process: a stray RANK must never hide an error."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1").strip() or "1")
        rank = int(os.environ.get("RANK", "0").strip() or "0")
    except ValueError:
        return False
    return world > 1 and 0 < rank < world


class CharnnCommand(TyperCommand):
    """Typer's plain help, with arguments named the click way: ``CHECKPOINT``
    and ``[FILE]...`` in the usage line, no ``<path>`` type after the name."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument" and not getattr(param, "hidden", False):
                name = _argument_name(param)
                if not param.required:
                    name = f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((_argument_name(param), record[1].replace("  [required]", "")))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(param: click.Parameter) -> str:
    return param.metavar or (param.name or "").upper()


class CharnnTyper(typer.Typer):
    """The app as a process runs it: standard output guarded before and after
    click (help text, usage errors), so that a closed or full stdout or a
    reader that left ends with one clear line (or quietly), never a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _prepare_stdout()
        try:
            super().__call__(*args, **kwargs)
            code: Any = 0
        except SystemExit as e:
            code = e.code
        except OSError as e:  # click's own output (help) to a full or closed stdout
            if os.environ.get("CHARNN_DEBUG"):
                raise  # the traceback CHARNN_DEBUG promises, whatever the error
            code = _stdout_failure(StdoutError(e))
        try:
            stdout.flush()
        except StdoutError as e:
            code = _stdout_failure(e) if code in (0, None) else code

        if isinstance(sys.stdout, click_utils.PacifyFlushWrapper):  # click saw the pipe break
            code = 0 if code in (0, 1, None) else code
        sys.exit(code)

    def command(self, name: Optional[str] = None, *, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(name, cls=cls or CharnnCommand, **kwargs)


def _prepare_stdout() -> None:
    if sys.stdout is None:
        # fd 1 is closed: hold it with /dev/null so no file opened later takes
        # fd 1 (and receives whatever a library prints), and fail writes clearly.
        _point_stdout_at_devnull()
        sys.stdout = _ClosedStdout()
    elif hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(errors="backslashreplace")  # lone surrogates never crash printing
        except (OSError, ValueError):
            pass


app = CharnnTyper(
    name="charnn",
    help="Train character-level recurrent language models on your own text, and generate from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


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
    """Run a command's body: charnn's errors become ``Error: ...`` + exit 1,
    Ctrl-C exit 130, a failed standard output one clear line + exit 1 (or,
    for a reader that went away, a quiet exit 0). No traceback reaches the
    user. Under torchrun only rank 0 prints the error; every rank exits with
    the code."""
    from ..errors import CharnnError

    try:
        result = body()
        stdout.flush()  # a full disk shows here, not in the interpreter's last flush
        return result
    except CharnnError as e:
        from ..training.trainer import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            say(interrupted_message(str(e)))
            raise typer.Exit(e.exit_code) from None  # 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM
        say(f"Error: {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        say("Interrupted.")
        raise typer.Exit(130) from None
    except StdoutError as e:
        raise typer.Exit(_stdout_failure(e)) from None
    except BrokenPipeError as e:
        raise typer.Exit(_stdout_failure(StdoutError(e))) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as e:  # a bug: say so plainly; CHARNN_DEBUG=1 shows the traceback
        if os.environ.get("CHARNN_DEBUG"):
            raise
        say(f"Error: unexpected {type(e).__name__}: {e}. This is a bug in charnn; "
            "rerun with CHARNN_DEBUG=1 for the traceback and report it.")
        raise typer.Exit(1) from None


def inference_only() -> None:
    """For commands that never train (sample, serve): ``MKL_CBWR=AUTO``, unless
    the user set it (see charnn/__init__.py). MKL reads it at its first call:
    call this before the first matrix product; child processes inherit it."""
    import charnn

    if not charnn.MKL_CBWR_GIVEN:
        os.environ["MKL_CBWR"] = "AUTO"


def say(text: str) -> None:
    """One message on stderr (no markup), from rank 0 only under torchrun."""
    if _quiet_rank():
        return
    try:
        # Messages quote file names and checkpoint strings: nothing in them
        # reaches the terminal raw (escape sequences, bidi overrides).
        err.print(safe_display(text, limit=None, keep="\n"), markup=False)
    except OSError:  # stderr itself is gone: nothing left to tell
        pass


def interrupted_message(text: str) -> str:
    """One sentence for a stopped run: the library says "interrupted at step
    7; saved ..." and the CLI capitalises it rather than prefixing a second
    "Interrupted."."""
    text = text.strip()
    if not text:
        return "Interrupted."
    if text.lower().startswith("interrupted"):
        text = text[0].upper() + text[1:]
    else:
        text = "Interrupted: " + text
    # A last line that is a command to type stays as it is (no full stop to copy).
    if text.endswith(".") or text.splitlines()[-1].startswith("Continue with: "):
        return text
    return text + "."


def parse_time_limit(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter("is empty; write it like 30s, 5m, 2h or 1h30m")
    from ..errors import ConfigError
    from ..training.schedule import parse_duration  # no torch import just to read an option

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


def fmt_span(seconds: float) -> str:
    """A length of time in words: ``40 seconds``, ``5 minutes``, ``1 hour 30 minutes``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    parts = [plural(h, "hour") if h else "", plural(m, "minute") if m else "",
             plural(s, "second") if s or not (h or m) else ""]
    return " ".join(p for p in parts if p)


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

