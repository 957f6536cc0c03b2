"""charnn sample's copy report and --max-copy: finding the training text,
and the footer on stderr (see docs/sampling.md, "What is copied")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import CharnnError, DataError
from .common import say


def single_sample(prime: str, generated: str, seed: int, guard: Any) -> Any:
    """The streamed sample as a :class:`Sample`, with its guard's figures."""
    from ..generation.sample import Sample

    if guard is None:
        return Sample(prime + generated, prime, seed)
    return Sample(prime + generated, prime, seed, max_copy=guard.max_copy,
                  redirected=guard.redirected_before(0, len(generated)),
                  copy_ended=guard.ended[0] >= 0 and len(generated) == guard.ended[0])


class CopyCheck:
    """The training text and its index, found once, when first needed: a
    text named with ``--against`` is read at once (a bad one is an error
    before any sample is made); the recorded corpus only when the report or
    the guard needs it."""

    def __init__(self, train_config: Any, against: Optional[Path], copy_span: int, report: bool):
        from ..generation.copies import read_against

        self.train_config = train_config if isinstance(train_config, dict) else {}
        encoding = self.train_config.get("encoding")
        self.text = (read_against(against, encoding if isinstance(encoding, str) else "utf-8")
                     if against is not None else None)
        self.copy_span = copy_span
        self.report = report
        self.index: Any = None
        self.note = ""
        self.label = ""

    def _index(self, required: bool) -> Any:
        from ..generation.copies import open_index, recorded_text

        if self.index is None and not self.note:
            text = self.text
            if text is None:
                text, note = recorded_text(self.train_config)
                if text is None:
                    if required:
                        raise DataError(f"--max-copy needs the training text, and {note}")
                    self.note = note
                    return None
            self.label = text.label
            self.index = open_index(text, progress=say)
        return self.index

    def guard(self, tokenizer: Any, max_copy: int) -> Any:
        from ..generation.copies import CopyGuard

        return CopyGuard(self._index(required=True), tokenizer, max_copy)

    def reports(self, samples: list[Any]) -> list[Any]:
        """A report per sample, or Nones (and a note on stderr saying why)."""
        from ..generation.copies import MAX_REPORT_CHARS, copy_report

        if not self.report:
            return [None] * len(samples)
        total = sum(len(s.text) for s in samples)
        if total > MAX_REPORT_CHARS:
            say(f"copied: not checked -- the samples hold {total:,} characters; the report checks at most "
                f"{MAX_REPORT_CHARS:,} (about 10 s); pass --no-copy-report to skip this note")
            return [None] * len(samples)
        try:
            index = self._index(required=False)
        except CharnnError as e:  # the sample is out already: say why there is no report, lose nothing
            self.note, index = str(e), None
        if index is None:
            say(f"copied: not checked -- {self.note}")
            return [None] * len(samples)
        return [copy_report(index, s.text, len(s.prime), self.copy_span, self.label) for s in samples]

    def to_dict(self, sample: Any, report: Any) -> dict[str, Any]:
        d = sample.to_dict()
        if self.report:
            d["copies"] = report.to_dict() if report is not None else None
        return d

    def footers(self, samples: list[Any], reports: list[Any]) -> None:
        """One line per sample on stderr."""
        for i, (s, r) in enumerate(zip(samples, reports)):
            parts = [r.footer()] if r is not None else []
            if s.max_copy is not None:
                line = f"max-copy {s.max_copy}: {s.redirected} step{'s' * (s.redirected != 1)} redirected"
                if s.copy_ended:
                    line += (f"; ended after {len(s.generated):,} characters: every character would have "
                             f"copied more than {s.max_copy}")
                parts.append(line)
            if parts:
                say((f"sample {i + 1}: " if len(samples) > 1 else "") + "; ".join(parts))
