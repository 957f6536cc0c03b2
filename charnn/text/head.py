"""The start of a text file, read incrementally: for commands that look at
the first N characters (``inspect --max-chars``), whatever the file's size.

The same checks as reading a corpus (:mod:`charnn.text.reading`): a regular file,
not binary, strict decoding with an error naming the byte offset, newlines
normalised. Memory and time are bounded by what the caller keeps, not by
the file: a 1 GB file costs one chunk beyond the characters asked for.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .reading import (BINARY_SNIFF_BYTES, ENCODING_HINT, _binary_reason, _sniff_binary, check_encoding, file_kind,
                      show_path)

CHUNK = 1 << 16  # bytes read at a time


def iter_text(path: str | os.PathLike, encoding: str = "utf-8", chunk: int = CHUNK) -> Iterator[str]:
    """Pieces of the file's text, in order, newlines normalised (CRLF and lone
    CR become LF, a leading byte-order mark dropped). Stop iterating to stop
    reading."""
    path = Path(path)
    check_encoding(encoding)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError(f"{show_path(path)} does not exist; check the path") from None
    except OSError as e:
        raise DataError(f"cannot read {show_path(path)}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{show_path(path)} is {file_kind(mode)}, not a regular file; pass a text file")
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        offset, first, sniffed, pending_cr = 0, True, False, False
        while True:
            try:
                raw = f.read(chunk)
            except OSError as e:
                raise DataError(f"cannot read {show_path(path)}: {e.strerror or e}") from None
            if not sniffed and _sniff_binary(raw[:BINARY_SNIFF_BYTES], encoding):
                reason = _binary_reason(raw[:4])
                if reason.endswith("not text"):
                    raise DataError(f"{show_path(path)} looks like a binary file, not text; pass a text file")
                raise DataError(f"{show_path(path)} {reason}")
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                bad = e.object[e.start : e.start + 1].hex() if isinstance(e.object, bytes) else "?"
                raise DataError(f"{show_path(path)} is not {encoding} text (invalid byte 0x{bad} near offset "
                                f"{offset + e.start}); {ENCODING_HINT}") from None
            except UnicodeError as e:
                raise DataError(f"{show_path(path)} is not {encoding} text ({e}); {ENCODING_HINT}") from None
            offset += len(raw)
            sniffed = True
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            if pending_cr:
                text = "\r" + text
            pending_cr = text.endswith("\r") and bool(raw)
            if pending_cr:
                text = text[:-1]
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if not raw:
                return
