"""Drawing an inspection: the gate-saturation scatter as a PNG (matplotlib,
optional) and the standalone HTML page (the text coloured by a unit's
activation, a picker of units, the scatter as SVG). No network requests."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


import numpy as np

from ..errors import CharnnError, ConfigError
from .inspection import GATE_TITLES, TANH_GATES, Inspection
from .report import PAGE_HEAD, pyplot, save_png, show_char  # noqa: F401  (pyplot: for the CLI)

__all__ = ["inspect_page", "saturation_png", "pyplot", "HTML_CHARS"]

GATE_COLOURS = {"i": "#1b9e77", "f": "#d95f02", "o": "#7570b3", "g": "#e7298a",
                "r": "#1b9e77", "z": "#d95f02", "n": "#e7298a"}


def saturation_png(result: Inspection, path: str | Path, title: str = "") -> Path:
    """Per layer, every unit of every gate as a point: fraction of characters
    left-saturated (x) against right-saturated (y). Needs matplotlib."""
    if not result.saturation:
        raise CharnnError("a vanilla RNN has no gates, so there is no saturation plot; "
                          "--plot applies to LSTM and GRU models")
    plt = pyplot()
    path = Path(path)
    L = result.num_layers
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 4.4), dpi=100, squeeze=False)
    try:
        for layer, ax in enumerate(axes[0]):
            for g in (s for s in result.saturation if s.layer == layer):
                ax.scatter(g.unit_left, g.unit_right, s=8, alpha=0.6, color=GATE_COLOURS[g.gate],
                           label=f"{g.gate} ({GATE_TITLES[g.gate]})", linewidths=0)
            ax.plot([0, 1], [1, 0], color="#999", linewidth=0.8, linestyle=":")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ax.set_xlabel("fraction left-saturated (< 0.1)")
            if layer == 0:
                ax.set_ylabel("fraction right-saturated (> 0.9)")
            ax.set_title(f"layer {layer}")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(loc="upper right", fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path)


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------
#
# One standalone file. Activations of the shown characters are stored for
# every layer, state and unit as int8, unit-major, base64, one <script
# type="application/octet-stream"> block per (layer, state), decoded only
# when a unit of that block is first shown. Each stores s = q/127 in -1..1,
# the colour coordinate; the value is s for h/g/n (tanh), (s+1)/2 for the
# sigmoid gates, and s * scale[unit] for c (scale = the unit's max |c| over the
# shown text). Size: chars x layers x hidden x (2 + gates) x 4/3 bytes plus
# ~70 bytes per character of markup.

HTML_CHARS = 2000  # default characters shown on the page


def _quantise(x: np.ndarray, kind: str) -> tuple[np.ndarray, list[float] | None]:
    """(K, H) float -> int8 (H, K) unit-major, and per-unit scales for c."""
    scales = None
    if kind == "sigmoid":
        s = x * 2.0 - 1.0
    elif kind == "c":
        m = np.abs(x).max(axis=0) if len(x) else np.zeros(x.shape[1])
        m = np.where(m > 0, m, 1.0)
        s, scales = x / m, [float(f"{v:.5g}") for v in m]
    else:
        s = x
    q = np.clip(np.rint(s * 127.0), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scales


def _kind(state: str) -> str:
    if state == "c":
        return "c"
    if state in ("h",) or state in TANH_GATES:
        return "tanh"
    return "sigmoid"


def _scatter_svg(result: Inspection) -> str:
    """Per layer, a 0..1 x 0..1 square: each unit of each gate a dot at (left, right)."""
    size, pad = 220, 34
    parts = []
    for layer in range(result.num_layers):
        dots = []
        for g in (s for s in result.saturation if s.layer == layer):
            pts = "".join(f'<circle cx="{pad + x * size:.1f}" cy="{pad + (1 - y) * size:.1f}" r="2.2" data-u="{u}"/>'
                          for u, (x, y) in enumerate(zip(g.unit_left.tolist(), g.unit_right.tolist())))
            dots.append(f'<g class="gate" data-layer="{layer}" data-gate="{g.gate}" fill="{GATE_COLOURS[g.gate]}" '
                        f'fill-opacity="0.6">{pts}</g>')
        w = size + 2 * pad
        axes = (f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="#fafafa" stroke="#888"/>'
                f'<line x1="{pad}" y1="{pad}" x2="{pad + size}" y2="{pad + size}" stroke="#ccc" stroke-dasharray="3"/>'
                f'<text x="{pad + size / 2}" y="{pad - 10}" text-anchor="middle" font-size="13">layer {layer}</text>'
                f'<text x="{pad}" y="{pad + size + 14}" font-size="10">0</text>'
                f'<text x="{pad + size}" y="{pad + size + 14}" font-size="10" text-anchor="end">1</text>'
                f'<text x="{pad + size / 2}" y="{pad + size + 26}" font-size="11" text-anchor="middle">'
                f'left-saturated (&lt; 0.1)</text>'
                f'<text x="{pad - 6}" y="{pad + 4}" font-size="10" text-anchor="end">1</text>'
                f'<text transform="translate({pad - 14},{pad + size / 2}) rotate(-90)" font-size="11" '
                f'text-anchor="middle">right-saturated (&gt; 0.9)</text>')
        parts.append(f'<svg class="scatter" width="{w}" height="{w}" viewBox="0 0 {w} {w}" '
                     f'xmlns="http://www.w3.org/2000/svg">{axes}{"".join(dots)}</svg>')
    legend = " ".join(f'<span class="sw" style="background:{GATE_COLOURS[g]}"></span>{g} {html.escape(GATE_TITLES[g])}'
                      for g in result.gates)
    return "".join(parts) + f'<div class="legend">{legend}</div>'


_PAGE = PAGE_HEAD + """h1 {{ font-size: 1.2em; }} h2 {{ font-size: 1.05em; margin-top: 1.4em; }}
.controls {{ display: flex; flex-wrap: wrap; gap: 0.6em 1.2em; align-items: center; margin: 0.6em 0; }}
.controls label {{ white-space: nowrap; }}
#info {{ font-family: ui-monospace, Menlo, Consolas, monospace; margin: 0.4em 0; }}
#scale {{ display: inline-block; width: 12em; height: 0.9em; vertical-align: middle;
         background: linear-gradient(to right, #2166ac, #f7f7f7, #b2182b); border: 1px solid #aaa; }}
.text {{ font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.45;
        border: 1px solid #ccc; padding: 1em; word-break: break-all; }}
/* Each character its own bidi isolate: a bidi control in the text (U+202E) acts on its own
   element only (its tooltip names it) and cannot reorder the characters after it. */
.text span.c {{ border-radius: 2px; cursor: default; unicode-bidi: isolate; }}
.text span.c:hover {{ outline: 2px solid #000; }}
.text span.nl {{ color: #999; }}
#panel {{ position: fixed; right: 1em; top: 1em; background: #fff; border: 1px solid #888; padding: 0.6em 0.9em;
         font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; min-width: 14em;
         box-shadow: 0 2px 6px #0003; }}
.scatter {{ margin-right: 1em; }} .scatter circle {{ cursor: pointer; }} .scatter circle:hover {{ stroke: #000; }}
.legend .sw {{ display: inline-block; width: 0.8em; height: 0.8em; margin: 0 0.3em 0 1em; border-radius: 50%; }}
table.tops td {{ padding: 0 0.8em 0 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
<div class="controls">
<label>top units per feature <select id="top">{top_options}</select></label>
<label>layer <select id="layer">{layer_options}</select></label>
<label>state <select id="state">{state_options}</select></label>
<label>unit <input id="unit" type="number" min="0" max="{max_unit}" value="0" style="width:5em"></label>
<button id="show">show</button>
</div>
<div id="info"></div>
<div>colour: <span id="lo"></span> <span id="scale"></span> <span id="hi"></span></div>
<div id="panel">hover over a character</div>
<div class="text" id="text">{spans}</div>
<h2>Gate saturation</h2>
<p>Each dot is one unit of one gate: the fraction of the {chars} characters on which it was
left-saturated (&lt; 0.1; tanh-valued g and n: &lt; -0.8) against right-saturated (&gt; 0.9; &gt; 0.8).
Click a dot to colour the text by that gate.</p>
{scatter}
<h2>Features</h2>
<table class="tops">{feature_rows}</table>
{blobs}
<script id="meta" type="application/json">{meta}</script>
<script>
(function () {{
  var meta = JSON.parse(document.getElementById("meta").textContent);
  var spans = document.getElementById("text").getElementsByClassName("c");
  var cache = {{}}, current = null;
  function block(layer, state) {{
    var key = layer + "-" + state;
    if (!cache[key]) {{
      var bin = atob(document.getElementById("q-" + key).textContent.trim());
      var a = new Int8Array(bin.length);
      for (var i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
      cache[key] = a;
    }}
    return cache[key];
  }}
  function colour(s) {{
    // diverging: -1 blue (#2166ac), 0 near-white (#f7f7f7), +1 red (#b2182b)
    var lo = [33, 102, 172], mid = [247, 247, 247], hi = [178, 24, 43];
    var end = s < 0 ? lo : hi, t = Math.min(1, Math.abs(s));
    var c = mid.map(function (m, k) {{ return Math.round(m + (end[k] - m) * t); }});
    return "rgb(" + c.join(",") + ")";
  }}
  function value(sel, s) {{
    if (sel.kind === "sigmoid") return (s + 1) / 2;
    if (sel.kind === "c") return s * meta.cscale[sel.layer][sel.unit];
    if (sel.kind === "feature") return meta.features[sel.name][sel.i];
    return s;
  }}
  function fmt(v) {{ return (v >= 0 ? "+" : "") + v.toFixed(3); }}
  function show(sel) {{
    var n = meta.shown, s = new Float32Array(n), i;
    if (sel.kind === "feature") {{
      var f = meta.features[sel.name], m = Math.max.apply(null, f.concat([1e-9]));
      for (i = 0; i < n; i++) s[i] = f[i] / m;
      sel.range = [0, m];
    }} else {{
      var a = block(sel.layer, sel.state), off = sel.unit * n;
      for (i = 0; i < n; i++) s[i] = a[off + i] / 127;
      sel.range = sel.kind === "sigmoid" ? [0, 1] : sel.kind === "c" ?
        [-meta.cscale[sel.layer][sel.unit], meta.cscale[sel.layer][sel.unit]] : [-1, 1];
    }}
    for (i = 0; i < n; i++) spans[i].style.background = colour(s[i]);
    sel.s = s;
    current = sel;
    document.getElementById("lo").textContent = sel.kind === "feature" ? "" : sel.range[0].toFixed(2);
    document.getElementById("hi").textContent = sel.range[1].toFixed(2);
    var label = sel.kind === "feature" ? "feature " + sel.name :
      "layer " + sel.layer + ", " + meta.state_titles[sel.state] + ", unit " + sel.unit;
    var rs = sel.kind === "feature" ? [] : meta.r.filter(function (e) {{
      return e[1] === sel.layer && e[2] === sel.state && e[3] === sel.unit; }});
    document.getElementById("info").textContent = label + (rs.length ? "   r with " + rs.map(function (e) {{
      return e[0] + " " + fmt(e[4]); }}).join(", ") : "");
    if (sel.kind !== "feature") {{
      document.getElementById("layer").value = sel.layer;
      document.getElementById("state").value = sel.state;
      document.getElementById("unit").value = sel.unit;
    }}
  }}
  function pick(layer, state, unit) {{
    var kind = state === "c" ? "c" : (state === "h" || meta.tanh_gates.indexOf(state) >= 0) ? "tanh" : "sigmoid";
    show({{kind: kind, layer: layer, state: state, unit: unit}});
  }}
  document.getElementById("top").addEventListener("change", function (e) {{
    var p = e.target.value.split(":");
    if (p[0] === "feature") show({{kind: "feature", name: p[1]}});
    else pick(+p[0], p[1], +p[2]);
  }});
  document.getElementById("show").addEventListener("click", function () {{
    var u = Math.max(0, Math.min(meta.hidden - 1, parseInt(document.getElementById("unit").value, 10) || 0));
    pick(+document.getElementById("layer").value, document.getElementById("state").value, u);
  }});
  var circles = document.querySelectorAll(".scatter circle");
  for (var k = 0; k < circles.length; k++) {{
    circles[k].addEventListener("click", function (e) {{
      var g = e.currentTarget.parentNode;
      pick(+g.getAttribute("data-layer"), g.getAttribute("data-gate"), +e.currentTarget.getAttribute("data-u"));
    }});
  }}
  var panel = document.getElementById("panel");
  document.getElementById("text").addEventListener("mouseover", function (e) {{
    var el = e.target;
    if (!el.classList || !el.classList.contains("c") || !current) return;
    var i = +el.getAttribute("data-i"), txt = "char " + i + "  " + meta.chars[i] + "\\n";
    txt += current.kind === "feature" ? current.name + " = " + value({{kind: "feature", name: current.name, i: i}}) :
      "value " + fmt(value(current, current.s[i]));
    meta.feature_names.forEach(function (name) {{ txt += "\\n" + name + " = " + meta.features[name][i]; }});
    panel.textContent = txt;
    panel.style.whiteSpace = "pre";
  }});
  var first = meta.first;
  if (first) pick(first[0], first[1], first[2]); else pick(0, "h", 0);
  document.body.setAttribute("data-ready", String(spans.length));
}})();
</script>
</body>
</html>
"""


def inspect_page(result: Inspection, title: str = "charnn inspect", top: int = 5,
                 chars: int | None = HTML_CHARS) -> str:
    """The standalone page for the first ``chars`` characters (at most those
    the result kept; None: all kept)."""
    shown = result.kept if chars is None else min(chars, result.kept)
    if shown < 1:
        raise ConfigError("the page needs per-character states: inspect with keep_chars of at least 1")
    text = result.text[:shown]
    spans = "".join(
        (f'<span class="c nl" data-i="{i}">↵</span>\n' if ch == "\n" else
         f'<span class="c" data-i="{i}">{html.escape(ch)}</span>')
        for i, ch in enumerate(text))
    states = ["h"] + (["c"] if result.cell == "lstm" else []) + list(result.gates)
    state_titles = {"h": "h (hidden state)", "c": "c (cell state)", **{g: f"{g} gate ({GATE_TITLES[g]})"
                                                                         for g in result.gates}}
    blobs, cscale = [], []
    for layer, trace in enumerate(result.layers):
        layer_scales: list[float] = []
        for s in states:
            q, scales = _quantise(trace.state(s)[:shown], _kind(s))
            if scales is not None:
                layer_scales = scales
            blobs.append(f'<script type="application/octet-stream" id="q-{layer}-{s}">'
                         f'{base64.b64encode(q.tobytes()).decode("ascii")}</script>')
        cscale.append(layer_scales)
    top_options, feature_rows, r_rows = [], [], []
    first = None
    for f in result.features:
        units = f.top(top)
        label = html.escape(f"{f.name}: {f.description}")
        if f.constant:
            feature_rows.append(f"<tr><td>{html.escape(f.name)}</td><td>constant over the text: r undefined</td></tr>")
            continue
        opts = [f'<option value="feature:{html.escape(f.name)}">the feature itself</option>']
        for u in units:
            opts.append(f'<option value="{u.layer}:{u.state}:{u.unit}">layer {u.layer} {u.state} unit {u.unit}  '
                        f'r = {u.r:+.3f}</option>')
            r_rows.append([f.name, u.layer, u.state, u.unit, round(u.r, 4)])
        if first is None and units:
            first = [units[0].layer, units[0].state, units[0].unit]
            opts[1] = opts[1].replace("<option ", "<option selected ", 1)
        top_options.append(f'<optgroup label="{label}">{"".join(opts)}</optgroup>')
        feature_rows.append(f"<tr><td>{html.escape(f.name)}</td><td>" + ", ".join(
            f"L{u.layer} {u.state}{u.unit} {u.r:+.2f}" for u in units) + "</td></tr>")
    feature_values = {f.name: [float(f"{v:.4g}") for v in f.values[:shown].tolist()] for f in result.features}
    meta = {"shown": shown, "hidden": result.hidden_size, "cscale": cscale, "r": r_rows, "first": first,
            "tanh_gates": sorted(TANH_GATES), "state_titles": state_titles, "chars": [show_char(c) for c in text],
            "features": feature_values, "feature_names": [f.name for f in result.features]}
    summary = (f"{result.cell} {result.num_layers}x{result.hidden_size}: {result.chars:,} characters inspected "
               f"(correlations and saturation over all of them); the first {shown:,} are shown. "
               "Pick a unit; each character is coloured by the unit's value after reading it "
               "(blue negative or closed, red positive or open).")
    return _PAGE.format(
        title=html.escape(title), summary=html.escape(summary), top_options="".join(top_options),
        layer_options="".join(f'<option value="{i}">{i}</option>' for i in range(result.num_layers)),
        state_options="".join(f'<option value="{s}">{html.escape(state_titles[s])}</option>' for s in states),
        max_unit=result.hidden_size - 1, spans=spans, chars=f"{result.chars:,}",
        scatter=_scatter_svg(result) if result.saturation else "<p>A vanilla RNN has no gates.</p>",
        feature_rows="".join(feature_rows), blobs="\n".join(blobs),
        meta=json.dumps(meta, ensure_ascii=True).replace("</", "<\\/"))
