"""Artefacts that explain a model: the surprisal page (standalone HTML), the
loss-curve chart drawn in text, and the loss-curve PNG.

Library code: it builds strings and files, it prints nothing. The terminal
colouring of ``eval --show`` is the CLI's (rich lives there); the colour scale
is shared from here so the page and the terminal agree.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import CharnnError

LN2 = math.log(2.0)

# Surprisal bands in bits per character: (upper bound, colour, label).
# A character the model found certain is green; one it never saw coming, red.
BANDS: list[tuple[float, str, str]] = [
    (1.0, "#1a9850", "< 1 bit"),
    (2.0, "#91cf60", "1-2 bits"),
    (4.0, "#d9ef8b", "2-4 bits"),
    (6.0, "#fee08b", "4-6 bits"),
    (8.0, "#fc8d59", "6-8 bits"),
    (math.inf, "#d73027", ">= 8 bits"),
]


# The same bands on a 16-colour terminal, where the colours above would be
# rounded to the nearest of the 16 and two bands would share one: names of the
# standard ANSI colours, in the same green -> yellow -> red order.
BANDS_16: list[str] = ["green", "bright_green", "bright_yellow", "yellow", "bright_red", "red"]


def band(bits: float) -> int:
    """Index into :data:`BANDS` of a surprisal in bits."""
    for i, (upper, _, _) in enumerate(BANDS):
        if bits < upper:
            return i
    return len(BANDS) - 1


def show_char(ch: str) -> str:
    """A visible, unambiguous rendering of one character (for tooltips, tables)."""
    if ch == " ":
        return "␣"
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if not ch.isprintable():
        return json.dumps(ch)[1:-1]
    return ch


def escape_vocab(chars: Sequence[str]) -> str:
    """The vocabulary as one line: control characters and backslash escaped."""
    # ensure_ascii: an unprintable non-ASCII character (a lone surrogate, a
    # zero-width space) becomes \uXXXX rather than reaching the terminal raw.
    return "".join(json.dumps(c)[1:-1] if not c.isprintable() or c == "\\" else c for c in chars)


# ---------------------------------------------------------------------------
# The surprisal page
# ---------------------------------------------------------------------------

# The start of every page charnn writes (a str.format template, as the pages are).
PAGE_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
"""

_PAGE = PAGE_HEAD + """h1 {{ font-size: 1.2em; }}
.summary {{ margin-bottom: 1em; }}
.legend span {{ display: inline-block; padding: 0.1em 0.6em; margin-right: 0.3em; border-radius: 3px; }}
.text {{ font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.6;
        border: 1px solid #ccc; padding: 1em; word-break: break-all; }}
/* Each character its own bidi isolate: a bidi control in the text (U+202E) acts on its own
   element only (its tooltip names it) and cannot reorder the characters after it. */
.text span.c, .text span.ctx {{ border-radius: 2px; cursor: default; unicode-bidi: isolate; }}
.text span.c:hover {{ outline: 2px solid #000; }}
.text span.ctx {{ color: #888; }}
#panel {{ position: fixed; right: 1em; top: 1em; background: #fff; border: 1px solid #888; padding: 0.6em 0.9em;
         font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; min-width: 14em; box-shadow: 0 2px 6px #0003; }}
#panel table {{ border-collapse: collapse; }}
#panel td {{ padding: 0 0.5em 0 0; }}
</style>
</head>
<body>
<h1>{title}</h1>
<div class="summary">{summary}</div>
<div class="legend">{legend}</div>
<p>Each character is coloured by its surprisal, -log<sub>2</sub> p(character | the text before it).
Hover over a character to see its probability and the model's top {top} guesses.</p>
<div id="panel">hover over a character</div>
{sections}
<script>
(function () {{
  var panel = document.getElementById("panel");
  function esc(s) {{ return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }}
  function show(el) {{
    var top = JSON.parse(el.getAttribute("data-top"));
    var rows = top.map(function (t) {{
      return "<tr><td>" + esc(t[0]) + "</td><td>" + (t[1] * 100).toFixed(2) + "%</td></tr>";
    }}).join("");
    panel.innerHTML = "<b>" + esc(el.getAttribute("data-char")) + "</b> p = " +
      (parseFloat(el.getAttribute("data-p")) * 100).toFixed(3) + "%, " + el.getAttribute("data-bits") +
      " bits<br>top {top}:<table>" + rows + "</table>";
  }}
  var spans = document.querySelectorAll("span.c");
  for (var i = 0; i < spans.length; i++) {{
    spans[i].addEventListener("mouseenter", function (e) {{ show(e.currentTarget); }});
  }}
  document.body.setAttribute("data-ready", String(spans.length));
}})();
</script>
</body>
</html>
"""


def _legend() -> str:
    return "".join(f'<span style="background:{colour}">{html.escape(label)}</span>' for _, colour, label in BANDS)


def _char_span(ch: str, loss: float, prob: float, top: list[tuple[str, float]]) -> str:
    bits = loss / LN2
    colour = BANDS[band(bits)][1]
    top_json = json.dumps([[show_char(c), round(float(p), 6)] for c, p in top], ensure_ascii=False)
    title = (f"{show_char(ch)}: p={prob:.4g} ({bits:.2f} bits); top: "
             + ", ".join(f"{show_char(c)} {p:.3f}" for c, p in top))
    return (f'<span class="c" style="background:{colour}" data-char="{html.escape(show_char(ch))}" '
            f'data-p="{prob:.6g}" data-bits="{bits:.2f}" data-top="{html.escape(top_json)}" '
            f'title="{html.escape(title)}">{html.escape(ch)}</span>')


def surprisal_section(name: str, chars: Sequence[str], loss: Sequence[float], prob: Sequence[float],
                      top: Sequence[Sequence[tuple[str, float]]], note: str = "") -> str:
    """One text: its first character (context only, grey), then one coloured
    element per scored character."""
    if not chars:
        return ""
    parts = [f'<span class="ctx" title="context only: the first character is not predicted">'
             f"{html.escape(chars[0])}</span>"]
    parts += [_char_span(ch, float(nats), float(p), list(t)) for ch, nats, p, t in zip(chars[1:], loss, prob, top)]
    head = f"<h2>{html.escape(name)}</h2>" + (f"<p>{html.escape(note)}</p>" if note else "")
    return head + '<div class="text">' + "".join(parts) + "</div>"


def surprisal_page(title: str, summary: str, sections: Sequence[str], top: int = 5) -> str:
    return _PAGE.format(title=html.escape(title), summary=html.escape(summary), legend=_legend(),
                        sections="\n".join(sections), top=top)


def write_text(path: str | Path, text: str) -> Path:
    """Write a page atomically as UTF-8. A lone surrogate (a vocabulary or text
    read with --encoding utf-7, a file name that is not UTF-8) has no UTF-8
    form; it is written as the escape show_char gives it (\\ud800), so every
    page is valid UTF-8 whatever strings it holds."""
    from ..storage.outputs import write_output

    return write_output(Path(path), text.encode("utf-8", "backslashreplace"))


# ---------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------

def loss_curves(metrics: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) as lists of (step, loss), finite values only."""
    def pick(key: str) -> list[tuple[int, float]]:
        out = []
        for row in metrics:
            v, s = row.get(key), row.get("step")
            if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
                out.append((int(s), float(v)))
        return out

    return pick("train_loss"), pick("val_loss")


def text_chart(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]],
               width: int = 60, height: int = 12) -> list[str]:
    """A loss-vs-step chart in plain characters: ``·`` train, ``o`` validation
    (``@`` where both fall in one cell). Empty list when there is nothing to draw."""
    points = list(train) + list(val)
    if not points:
        return []
    s_min, s_max = min(p[0] for p in points), max(p[0] for p in points)
    l_min, l_max = min(p[1] for p in points), max(p[1] for p in points)
    if l_max - l_min < 1e-9:
        l_min, l_max = l_min - 0.5, l_max + 0.5
    grid = [[" "] * width for _ in range(height)]

    def cell(step: int, loss: float) -> tuple[int, int]:
        x = 0 if s_max == s_min else round((step - s_min) / (s_max - s_min) * (width - 1))
        y = round((l_max - loss) / (l_max - l_min) * (height - 1))
        return y, x

    for step, loss in train:
        y, x = cell(step, loss)
        grid[y][x] = "·"
    for step, loss in val:
        y, x = cell(step, loss)
        grid[y][x] = "@" if grid[y][x] == "·" else "o"
    label_w = max(len(f"{l_max:.3f}"), len(f"{l_min:.3f}"))
    lines = []
    for i, row in enumerate(grid):
        label = f"{l_max:.3f}" if i == 0 else f"{l_min:.3f}" if i == height - 1 else ""
        lines.append(f"{label:>{label_w}} |" + "".join(row))
    lines.append(" " * label_w + " +" + "-" * width)
    left, right = f"step {s_min}", f"step {s_max}"
    lines.append(" " * (label_w + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    lines.append(" " * (label_w + 2) + "· train loss   o validation loss   (nats/char)")
    return lines


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or a CharnnError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharnnError("--plot needs matplotlib, which is not installed; "
                          "install it with: pip install 'charnn[plot]' (or pip install matplotlib)") from None
    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (its folder made if needed) and close it."""
    from ..storage.outputs import write_output

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        pyplot().close(fig)
    return write_output(Path(path), buffer.getvalue())


def plot_png(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: str | Path,
             title: str = "") -> Path:
    """Train and validation loss against step, as a PNG (needs matplotlib)."""
    plt = pyplot()
    if not train and not val:
        raise CharnnError("this checkpoint has no loss history (metrics) to plot")
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], label="train", color="#4575b4", linewidth=1.2)
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], label="validation", color="#d73027",
                    marker="o", linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/char)")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path)
