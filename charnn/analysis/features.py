"""Features of a text, one value per character, for finding the units of a
model that track them (``charnn inspect``): where a character is in its line,
inside a string or comment, bracket depth, indentation, inside a word, and
the user's own ``NAME=REGEX`` patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..errors import ConfigError

__all__ = ["BUILTIN_FEATURES", "FeatureSpec", "parse_feature", "text_features"]

# ---------------------------------------------------------------------------
# Features of the text
# ---------------------------------------------------------------------------
#
# One value per character. Span features (in_string, in_comment, regexes)
# are 1 on every character of the span, its delimiters included.
#
# The string/comment/bracket scanner reads code the way most C-like and Python
# tokenizers do, in one pass, so quotes inside comments and '#' inside strings
# do not count:
#   - outside strings and comments, ' or " opens a string; ''' or """ opens a
#     triple-quoted one. A backslash escapes the next character. A string ends
#     at its own closing quote(s); a single-quoted one also ends (unclosed) at
#     the end of its line, so an apostrophe in prose ("don't") or a comment
#     runs to the end of that line at most.
#   - '#' and '//' start a comment to the end of the line (the newline is not
#     in it); '/*' starts one up to and including '*/'. Note that '//' is also
#     Python's floor division: in Python text, the rest of such a line counts
#     as comment.
#   - bracket_depth counts ( [ { minus ) ] } outside strings and comments,
#     never below 0; an opening bracket already counts on itself, a closing
#     one does not (the depth after reading the character).

BUILTIN_FEATURES: dict[str, str] = {
    "line_position": "characters since the last newline (0 on the newline itself)",
    "in_string": "1 inside a quoted string, quotes included (' \" ''' \"\"\")",
    "bracket_depth": "nesting depth of ( [ { outside strings and comments",
    "indent": "leading spaces/tabs of the line the character is on",
    "in_comment": "1 inside a comment: # or // to the end of the line, /* ... */",
    "in_word": "1 on letters, digits and _",
}

_SPECIAL = re.compile(r"""['"#()\[\]{}]|//|/\*""")
_STRING_BODY = {
    "'": re.compile(r"(?:[^'\\\n]|\\[\s\S])*'?"),
    '"': re.compile(r'(?:[^"\\\n]|\\[\s\S])*"?'),
    "'''": re.compile(r"(?:[^'\\]|\\[\s\S]|'(?!''))*(?:''')?"),
    '"""': re.compile(r'(?:[^"\\]|\\[\s\S]|"(?!""))*(?:""")?'),
}


def _scan_code(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(in_string, in_comment, bracket_depth), each (T,), by the rules above."""
    n = len(text)
    in_string = np.zeros(n, dtype=np.float64)
    in_comment = np.zeros(n, dtype=np.float64)
    depth_at = np.zeros(n, dtype=np.float64)
    depth, pos = 0, 0
    while pos < n:
        m = _SPECIAL.search(text, pos)
        start = m.start() if m else n
        depth_at[pos:start] = depth
        if m is None:
            break
        tok = m.group()
        if tok in ("'", '"'):
            opener = tok * 3 if text.startswith(tok * 3, start) else tok
            body = _STRING_BODY[opener].match(text, start + len(opener))
            end = body.end()
            in_string[start:end] = 1
        elif tok in ("#", "//"):
            end = text.find("\n", start)
            end = n if end < 0 else end
            in_comment[start:end] = 1
        elif tok == "/*":
            end = text.find("*/", start + 2)
            end = n if end < 0 else end + 2
            in_comment[start:end] = 1
        else:
            depth = depth + 1 if tok in "([{" else max(0, depth - 1)
            end = start + 1
        depth_at[start:end] = depth
        pos = end
    return in_string, in_comment, depth_at


def _line_position(text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    idx = np.arange(len(codes))
    last_newline = np.maximum.accumulate(np.where(codes == 10, idx, -1))  # -1: a newline imagined before the text
    return (idx - last_newline).astype(np.float64)


def _indent(text: str) -> np.ndarray:
    lines = text.split("\n")
    widths = np.array([len(line) - len(line.lstrip(" \t")) for line in lines], dtype=np.float64)
    lengths = np.array([len(line) + 1 for line in lines])  # each line owns the newline that ends it
    return np.repeat(widths, lengths)[: len(text)]


def _in_word(text: str) -> np.ndarray:
    return np.fromiter((c.isalnum() or c == "_" for c in text), dtype=bool, count=len(text)).astype(np.float64)


def _regex_feature(pattern: re.Pattern, text: str) -> np.ndarray:
    marks = np.zeros(len(text) + 1, dtype=np.int64)
    for m in pattern.finditer(text):
        if m.end() > m.start():  # empty matches cover no character
            marks[m.start()] += 1
            marks[m.end()] -= 1
    return (np.cumsum(marks[:-1]) > 0).astype(np.float64)


@dataclass(frozen=True)
class FeatureSpec:
    """A feature to correlate: a built-in name, a regex, or given values."""

    name: str
    pattern: re.Pattern | None = None
    values: np.ndarray | None = None

    @property
    def description(self) -> str:
        if self.pattern is not None:
            return f"1 inside a match of /{self.pattern.pattern}/"
        if self.values is not None:
            return "given values"
        return BUILTIN_FEATURES[self.name]


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_feature(spec: str) -> FeatureSpec:
    """``"NAME=REGEX"`` (1 on the characters inside a match; ``^``/``$`` match
    at line breaks) or the name of a built-in feature."""
    if "=" not in spec:
        if spec in BUILTIN_FEATURES:
            return FeatureSpec(spec)
        raise ConfigError(f"feature {spec!r} is neither a built-in ({', '.join(BUILTIN_FEATURES)}) nor "
                          "NAME=REGEX; write it like --feature 'def=^def '")
    name, regex = spec.split("=", 1)
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(f"feature name {name!r} in {spec!r}: use letters, digits and _ (starting with a "
                          "letter), like --feature 'def=^def '")
    if name in BUILTIN_FEATURES:
        raise ConfigError(f"feature name {name!r} is taken by a built-in feature; choose another name")
    if not regex:
        raise ConfigError(f"feature {name!r} has an empty regular expression; write it like {name}=REGEX")
    try:
        pattern = re.compile(regex, re.MULTILINE)
    except re.error as e:
        raise ConfigError(f"feature {name!r}: {regex!r} is not a valid regular expression ({e}); "
                          "fix the pattern (Python re syntax)") from None
    return FeatureSpec(name, pattern=pattern)


def _feature_specs(features: Iterable[Any] | None) -> list[FeatureSpec]:
    if features is None:
        return [FeatureSpec(name) for name in BUILTIN_FEATURES]
    specs: list[FeatureSpec] = []
    for item in features:
        if isinstance(item, FeatureSpec):
            spec = item
        elif isinstance(item, str):
            spec = parse_feature(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            spec = FeatureSpec(item[0], values=np.asarray(item[1], dtype=np.float64))
        else:
            raise ConfigError(f"a feature is a built-in name, 'NAME=REGEX' or a (name, values) pair; got {item!r}")
        if any(s.name == spec.name for s in specs):
            raise ConfigError(f"feature {spec.name!r} is given twice; give each feature once")
        specs.append(spec)
    return specs


def text_features(text: str, features: Iterable[Any] | None = None) -> dict[str, np.ndarray]:
    """Each feature's value on every character of ``text``, float64 (T,).
    ``features``: built-in names, ``"NAME=REGEX"`` strings or (name, values)
    pairs; None: all the built-ins."""
    specs = _feature_specs(features)
    out: dict[str, np.ndarray] = {}
    scanned: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for spec in specs:
        if spec.values is not None:
            if spec.values.shape != (len(text),):
                raise ConfigError(f"feature {spec.name!r} has {spec.values.size} values for {len(text)} characters; "
                                  "give one value per character")
            values = spec.values
        elif spec.pattern is not None:
            values = _regex_feature(spec.pattern, text)
        elif spec.name in ("in_string", "in_comment", "bracket_depth"):
            scanned = scanned or _scan_code(text)
            values = scanned[("in_string", "in_comment", "bracket_depth").index(spec.name)]
        else:
            values = {"line_position": _line_position, "indent": _indent, "in_word": _in_word}[spec.name](text)
        out[spec.name] = values
    return out


