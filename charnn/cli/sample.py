"""charnn sample: generate text from a checkpoint."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .arguments import CHECKPOINT_HELP, named_checkpoint
from .copies import CopyCheck, single_sample
from .common import (DEVICE_HELP, Unknown, app, at_least, dumps, err, inference_only, parse_device, plural,
                     run_command, stdout, unit_interval)

# ---------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------

SAMPLE_DIVIDER = "-" * 40  # printed after each of several samples
SMALL_BATCH = 16  # below this many samples a step is too little work to split across threads


class SamplePrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _temperature(value: float) -> float:
    if not (value >= 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be 0 (greedy) or a positive number, got {value}")
    return value


def _max_copy(value: Optional[int]) -> Optional[int]:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be at least 1, got {value}: it is the longest span of the training text "
                                 "a sample may repeat, and every single character occurs in it, so 0 cannot be "
                                 "met. Leave --max-copy out for no limit, or try 20")
    return value


def _stop_string(value: Optional[str]) -> Optional[str]:
    if value == "":
        raise typer.BadParameter("must not be empty")
    return value


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", show_default=False, help=CHECKPOINT_HELP,
                                               callback=named_checkpoint)],
    prime: Annotated[Optional[str], typer.Option(
        "--prime", "-p", metavar="TEXT", show_default=False,
        help="Text to start from (printed first).")] = None,
    prime_file: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False, help="Read the prime from this UTF-8 file instead.")] = None,
    length: Annotated[int, typer.Option(
        "--length", "-n", metavar="N", callback=at_least(0),
        help="Characters to generate after the prime (at most, with --stop).")] = 500,
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", metavar="T", callback=_temperature,
        help="Sampling temperature; 0 is greedy (always the most likely character).")] = 0.8,
    top_k: Annotated[int, typer.Option(
        metavar="K", callback=at_least(0),
        help="Sample only from the K most likely characters; 0 is off, 1 is greedy.")] = 0,
    top_p: Annotated[float, typer.Option(
        metavar="P", callback=unit_interval,
        help="Nucleus sampling: only the most likely characters that together have "
             "probability P, between 0 (exclusive) and 1.")] = 1.0,
    num_samples: Annotated[int, typer.Option(
        "--num-samples", "-m", metavar="N", callback=at_least(1),
        help="Samples to generate, together as one batch.")] = 1,
    seed: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False,
        help="Random seed: the same seed, checkpoint and options give the same text; sample i "
             "uses seed+i.  [default: a random seed, shown on stderr]")] = None,
    stop: Annotated[Optional[str], typer.Option(
        metavar="TEXT", callback=_stop_string, show_default=False,
        help="End each sample just before the first occurrence of this text after the prime "
             "(not printed).")] = None,
    unknown: Annotated[Unknown, typer.Option(
        metavar="[error|skip]",
        help="Prime characters outside the model's vocabulary: error (name them) or skip "
             "(drop them).")] = Unknown.error,
    device: Annotated[str, typer.Option(metavar="DEVICE", callback=parse_device, help=DEVICE_HELP)] = "cpu",
    threads: Annotated[Optional[int], typer.Option(
        metavar="N", callback=at_least(1), show_default=False,
        help="CPU threads for torch.  [default: 1 for fewer than 16 samples, else OMP_NUM_THREADS if "
             "set, else the idle cores, at most 4]")] = None,
    precision: Annotated[SamplePrecision, typer.Option(
        metavar="[auto|fp32|bf16]",
        help="Weights in fp32 (exact) or bf16; auto picks bf16 only for 16 or more samples on "
             "a CPU with AMX.")] = SamplePrecision.auto,
    as_json: Annotated[bool, typer.Option(
        "--json", help='Print a JSON list of {"text", "prime", "seed", "copies"} objects instead of plain '
                       'text.')] = False,
    max_copy: Annotated[Optional[int], typer.Option(
        metavar="N", callback=_max_copy, show_default=False,
        help="Never repeat more than N characters of the training text verbatim: characters that would are "
             "masked before each pick.  [default: no limit]")] = None,
    copy_span: Annotated[int, typer.Option(
        metavar="L", callback=at_least(1),
        help="The copy report counts spans of at least L characters copied from the training text.")] = 20,
    against: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False,
        help="The training text to check copies against (a file or folder).  [default: the corpus the "
             "checkpoint records, if it is unchanged]")] = None,
    no_copy_report: Annotated[bool, typer.Option(
        "--no-copy-report", help="Skip the copy report (and reading the training text for it).")] = False,
) -> None:
    """Generate text from a checkpoint. One sample streams to stdout as it is
    generated; several print one after another, each followed by a divider line."""
    if prime is not None and prime_file is not None:
        raise typer.BadParameter("give --prime or --prime-file, not both", param_hint="'--prime-file'")

    def body() -> None:
        inference_only()  # before torch's first matrix product
        import torch

        from ..storage.checkpoint import load_model
        from ..errors import describe_char
        from ..generation.sample import check_prime, generate, generate_samples, random_seed, read_prime_file
        from ..model.devices import resolve_device, set_threads

        text = read_prime_file(prime_file) if prime_file is not None else (prime or "")
        model, tokenizer, ckpt = load_model(checkpoint, device=resolve_device(device))
        copies = CopyCheck(ckpt.train_config, against, copy_span, report=not no_copy_report)
        guard = copies.guard(tokenizer, max_copy) if max_copy is not None else None
        usable, dropped = check_prime(tokenizer, text, unknown.value)
        if dropped:
            err.print(f"Skipping {plural(len(dropped), 'prime character')} not in the model's vocabulary: "
                      + ", ".join(describe_char(c) for c in dropped), markup=False)
        chosen = random_seed() if seed is None else seed
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=chosen, stop=stop,
                       precision=precision.value, guard=guard)
        if threads is None and num_samples < SMALL_BATCH:
            # One step of a few streams is microseconds of work: a second thread
            # only adds synchronisation (and on a busy machine, waiting for a core).
            torch.set_num_threads(1)
        else:
            set_threads(threads)
        out = stdout
        if num_samples == 1 and not as_json:
            stream = generate(model, tokenizer, usable, length, **options)
            out.write(usable)
            out.flush()
            chars = []
            for ch in stream:
                out.write(ch)
                out.flush()
                chars.append(ch)
            out.write("\n")
            out.flush()
            samples = [single_sample(usable, "".join(chars), chosen, guard)]
            reports = copies.reports(samples)
        else:
            samples = generate_samples(model, tokenizer, usable, length, num_samples=num_samples, **options)
            reports = copies.reports(samples)
            if as_json:
                out.write(dumps([copies.to_dict(s, r) for s, r in zip(samples, reports)], ensure_ascii=False) + "\n")
            else:
                for s in samples:
                    out.write(s.text + "\n" + SAMPLE_DIVIDER + "\n")
        out.flush()
        if seed is None:
            err.print(f"seed {chosen} (pass --seed {chosen} to repeat)", markup=False)
        copies.footers(samples, reports)

    run_command(body)


