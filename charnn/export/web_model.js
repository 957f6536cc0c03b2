"use strict";
// charnn's exported model: the cell equations, the random numbers and the pick
// of `charnn sample`, in plain JavaScript. The same source runs in a Web Worker
// (from a Blob URL) and, where a worker cannot be made, on the page itself.
//
// Arithmetic is float64 throughout, from the stored weights (Float32Array):
// charnn samples in float32, so the two sides' probabilities differ by a tiny
// delta and a character can differ only at a near-tie (see docs/export.md).
// Each function below repeats charnn's own: the LSTM/GRU/RNN equations of
// torch, Philox4x32-10 (charnn/generation/rng.py) and the inverse-CDF pick
// with top-k/top-p (charnn/generation/sample.py: pick_ids, filter_logits).

const CharnnModel = (() => {
  // One stored tensor as float32 values (the page's weights).
  function decode(bytes, spec) {
    const n = spec.shape.reduce((a, b) => a * b, 1);
    const base = bytes.byteOffset + spec.offset;
    if (spec.dtype === "f32") return new Float32Array(bytes.buffer.slice(base, base + 4 * n));
    const out = new Float32Array(n);
    // int16 or int8 with one float32 scale per row: value = fround(q * scale),
    // as torch computes it in float32 (q * scale is exact in float64).
    const q = spec.dtype === "i16" ? new Int16Array(bytes.buffer, base, n) : new Int8Array(bytes.buffer, base, n);
    const scales = new Float32Array(bytes.buffer.slice(bytes.byteOffset + spec.scales, bytes.byteOffset + spec.scales + 4 * spec.shape[0]));
    const cols = n / spec.shape[0];
    for (let r = 0, i = 0; r < spec.shape[0]; r++) for (let k = 0; k < cols; k++, i++) out[i] = Math.fround(q[i] * scales[r]);
    return out;
  }

  // out[r] = add[r] + W[r, :] . x, W (rows, cols) row-major. Four rows per
  // pass: each x[k] is read once for four products, and the four sums are
  // independent (no chain of dependent additions).
  function matvec(W, rows, cols, x, add, out) {
    let r = 0;
    for (; r + 3 < rows; r += 4) {
      const o0 = r * cols, o1 = o0 + cols, o2 = o1 + cols, o3 = o2 + cols;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let k = 0; k < cols; k++) {
        const xk = x[k];
        s0 += W[o0 + k] * xk; s1 += W[o1 + k] * xk; s2 += W[o2 + k] * xk; s3 += W[o3 + k] * xk;
      }
      out[r] = add[r] + s0; out[r + 1] = add[r + 1] + s1; out[r + 2] = add[r + 2] + s2; out[r + 3] = add[r + 3] + s3;
    }
    for (; r < rows; r++) {
      const o = r * cols;
      let s = 0;
      for (let k = 0; k < cols; k++) s += W[o + k] * x[k];
      out[r] = add[r] + s;
    }
  }

  function sigmoid(x) { return 1 / (1 + Math.exp(-x)); }

  class Model {
    constructor(meta, bytes) {
      const t = {};
      for (const spec of meta.tensors) t[spec.name] = decode(bytes, spec);
      this.cell = meta.cell; this.L = meta.num_layers; this.H = meta.hidden_size;
      this.E = meta.embedding_dim; this.V = meta.vocab.length;
      this.G = { lstm: 4, gru: 3, rnn: 1 }[this.cell];
      const H = this.H, GH = this.G * H;
      this.emb = t["embedding.weight"];
      this.wih0 = t["rnn.weight_ih_l0"];
      this.whh = []; this.wih = []; this.bih = []; this.bhh = []; this.bias = [];
      for (let l = 0; l < this.L; l++) {
        const bih = Float64Array.from(t[`rnn.bias_ih_l${l}`]), bhh = Float64Array.from(t[`rnn.bias_hh_l${l}`]);
        this.bih.push(bih); this.bhh.push(bhh);
        this.bias.push(bih.map((v, i) => v + bhh[i]));
        this.whh.push(t[`rnn.weight_hh_l${l}`]);
        this.wih.push(t[`rnn.weight_ih_l${l}`]);
      }
      // LSTM and RNN layers >= 1: [W_ih | W_hh] in one matrix, multiplied by [x; h] in one pass.
      this.wcat = [null];
      for (let l = 1; l < this.L; l++) {
        if (this.cell === "gru") { this.wcat.push(null); continue; }
        const w = new Float32Array(GH * 2 * H), a = this.wih[l], b = this.whh[l];
        for (let r = 0; r < GH; r++) { w.set(a.subarray(r * H, (r + 1) * H), r * 2 * H); w.set(b.subarray(r * H, (r + 1) * H), r * 2 * H + H); }
        this.wcat.push(w);
      }
      this.headW = t["head.weight"]; this.headB = Float64Array.from(t["head.bias"]);
      this.rows0 = new Array(this.V).fill(null); // layer 0's input part per character, made when first needed
      this.zero = new Float64Array(GH);
      this.gates = new Float64Array(GH); this.gh = new Float64Array(GH);
      this.xh = new Float64Array(2 * H);
      this.logits = new Float64Array(this.V);
      this.reset();
    }

    reset() {
      this.h = []; this.c = [];
      for (let l = 0; l < this.L; l++) { this.h.push(new Float64Array(this.H)); this.c.push(new Float64Array(this.H)); }
    }

    // W_ih_l0 . embedding[id] + b_ih (+ b_hh, except for a GRU, which keeps it inside r * (...)).
    row0(id) {
      let row = this.rows0[id];
      if (row) return row;
      const x = Float64Array.from(this.emb.subarray(id * this.E, (id + 1) * this.E));
      row = new Float64Array(this.G * this.H);
      matvec(this.wih0, this.G * this.H, this.E, x, this.cell === "gru" ? this.bih[0] : this.bias[0], row);
      this.rows0[id] = row;
      return row;
    }

    // Read character `id`; the logits of the next one land in this.logits.
    step(id) {
      const H = this.H, GH = this.G * H, a = this.gates, gh = this.gh, xh = this.xh;
      let x = null;
      for (let l = 0; l < this.L; l++) {
        const h = this.h[l];
        if (this.cell === "gru") {
          if (l === 0) a.set(this.row0(id)); else matvec(this.wih[l], GH, H, x, this.bih[l], a);
          matvec(this.whh[l], GH, H, h, this.bhh[l], gh);
          for (let j = 0; j < H; j++) {
            const r = sigmoid(a[j] + gh[j]), z = sigmoid(a[H + j] + gh[H + j]);
            const n = Math.tanh(a[2 * H + j] + r * gh[2 * H + j]);
            h[j] = (1 - z) * n + z * h[j];
          }
        } else {
          if (l === 0) matvec(this.whh[0], GH, H, h, this.row0(id), a);
          else { xh.set(x, 0); xh.set(h, H); matvec(this.wcat[l], GH, 2 * H, xh, this.bias[l], a); }
          if (this.cell === "rnn") {
            for (let j = 0; j < H; j++) h[j] = Math.tanh(a[j]);
          } else { // torch's gate order: i, f, g, o
            const c = this.c[l];
            for (let j = 0; j < H; j++) {
              const i = sigmoid(a[j]), f = sigmoid(a[H + j]), g = Math.tanh(a[2 * H + j]), o = sigmoid(a[3 * H + j]);
              c[j] = f * c[j] + i * g;
              h[j] = o * Math.tanh(c[j]);
            }
          }
        }
        x = h;
      }
      matvec(this.headW, this.V, H, x, this.headB, this.logits);
      return this.logits;
    }
  }

  // -- Philox4x32-10 (charnn/generation/rng.py) ---------------------------------
  function mulhi(a, b) { // the high 32 bits of a 32 x 32-bit product, exactly
    const aL = a & 0xffff, aH = a >>> 16, bL = b & 0xffff, bH = b >>> 16;
    const lh = aL * bH, hl = aH * bL;
    const mid = ((aL * bL) >>> 16) + (lh & 0xffff) + (hl & 0xffff);
    return (aH * bH + Math.floor(lh / 65536) + Math.floor(hl / 65536) + Math.floor(mid / 65536)) >>> 0;
  }

  // The uniform of step t (t < 2^32) for the key (lo, hi) = the seed's two 32-bit words.
  function uniform(lo, hi, t) {
    let c0 = t >>> 0, c1 = 0, c2 = 0, c3 = 0, k0 = lo >>> 0, k1 = hi >>> 0;
    for (let r = 0; r < 10; r++) {
      const h0 = mulhi(c0, 0xD2511F53), l0 = Math.imul(c0, 0xD2511F53) >>> 0;
      const h1 = mulhi(c2, 0xCD9E8D57), l1 = Math.imul(c2, 0xCD9E8D57) >>> 0;
      const n0 = (h1 ^ c1 ^ k0) >>> 0, n2 = (h0 ^ c3 ^ k1) >>> 0;
      c0 = n0; c1 = l1; c2 = n2; c3 = l0;
      k0 = (k0 + 0x9E3779B9) >>> 0; k1 = (k1 + 0xBB67AE85) >>> 0;
    }
    return ((c0 >>> 5) * 67108864 + (c1 >>> 6)) / 9007199254740992;
  }

  // -- the pick (charnn/generation/sample.py) ------------------------------------
  class Picker {
    constructor(V, temperature, topK, topP) {
      this.V = V; this.T = temperature;
      this.greedy = temperature === 0 || topK === 1;
      const filtered = !this.greedy && ((topK > 0 && topK < V) || topP < 1);
      this.topK = filtered && topK < V ? topK : 0;
      this.topP = filtered ? topP : 1;
      this.z = new Float64Array(V); this.e = new Float64Array(V); this.c = new Float64Array(V);
      this.sorted = new Float64Array(V); this.order = Array.from({ length: V }, (_, i) => i);
      this.prob = 0; // probability of the last pick under the distribution it was drawn from
    }

    filter(z) {
      const V = this.V;
      if (this.topK) {
        const s = this.sorted;
        s.set(z); s.sort(); // ascending
        const kth = s[V - this.topK];
        for (let v = 0; v < V; v++) if (z[v] < kth) z[v] = -Infinity;
      }
      if (this.topP < 1) {
        const order = this.order;
        for (let v = 0; v < V; v++) order[v] = v;
        order.sort((a, b) => (z[b] - z[a]) || (a - b)); // descending, ties lower id first (-inf - -inf is NaN: falls to ids)
        const top = z[order[0]];
        let total = 0;
        const p = this.sorted;
        for (let j = 0; j < V; j++) { p[j] = Math.exp(z[order[j]] - top); total += p[j]; }
        let cum = 0;
        const drop = [];
        for (let j = 0; j < V; j++) {
          const pj = p[j] / total;
          cum += pj;
          if (j > 0 && cum - pj >= this.topP) drop.push(order[j]);
        }
        for (const v of drop) z[v] = -Infinity;
      }
    }

    pick(logits, u) {
      const V = this.V;
      if (this.greedy) {
        const e = this.e;
        let best = 0, m = logits[0], total = 0;
        for (let v = 1; v < V; v++) if (logits[v] > m) { m = logits[v]; best = v; }
        for (let v = 0; v < V; v++) { e[v] = Math.exp(logits[v] - m); total += e[v]; }
        this.total = total;
        this.prob = 1 / total; // shading: the probability at temperature 1
        return best;
      }
      const z = this.z, e = this.e, c = this.c;
      let m = -Infinity;
      for (let v = 0; v < V; v++) if (logits[v] > m) m = logits[v];
      for (let v = 0; v < V; v++) z[v] = (logits[v] - m) / this.T;
      if (this.topK || this.topP < 1) this.filter(z);
      let run = 0;
      for (let v = 0; v < V; v++) { e[v] = Math.exp(z[v]); run += e[v]; c[v] = run; }
      const total = c[V - 1], limit = u * total;
      let id = 0;
      while (id < V && c[id] <= limit) id++;
      if (id >= V) { id = V - 1; while (id > 0 && !(e[id] > 0)) id--; } // u * total rounded up to total
      this.total = total;
      this.prob = e[id] / total;
      return id;
    }

    // The `k` likeliest ids after a pick, with their probabilities.
    top(k) {
      const out = [], e = this.e;
      for (let v = 0; v < this.V; v++) {
        const p = e[v] / this.total;
        if (!(p > 0)) continue;
        if (out.length < k) out.push([v, p]);
        else if (p > out[k - 1][1]) out[k - 1] = [v, p];
        else continue;
        out.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
      }
      return out;
    }
  }

  // -- one run: the prime, then `n` characters, cut before `stop` -----------------
  // Work is done in slices (`run(ms)`), so a worker can take a new message
  // between them and the page can stay responsive without one.
  class Job {
    constructor(model, vocab, opts) {
      this.model = model; this.vocab = vocab; this.opts = opts;
      this.picker = new Picker(model.V, opts.temperature, opts.top_k, opts.top_p);
      this.ids = opts.ids; this.read = 0; this.t = 0; this.done = false;
      this.pending = ""; this.out = { text: "", probs: [], tops: [] }; this.pendingMeta = [];
      model.reset();
    }

    // Pass `ch` through, holding back characters that may begin `stop` (sample._until).
    emit(ch, meta) {
      const stop = this.opts.stop;
      if (!stop) { this.push(ch, meta); return; }
      this.pending += ch; this.pendingMeta.push(...Array.from(ch, () => meta));
      const found = this.pending.indexOf(stop);
      if (found >= 0) { this.flushPending(found); this.pending = ""; this.pendingMeta = []; this.done = true; return; }
      let keep = 0;
      for (let j = Math.min(stop.length - 1, this.pending.length); j > 0; j--) {
        if (this.pending.endsWith(stop.slice(0, j))) { keep = j; break; }
      }
      this.flushPending(this.pending.length - keep);
    }

    flushPending(upto) {
      const text = this.pending.slice(0, upto), meta = this.pendingMeta.slice(0, upto);
      this.pending = this.pending.slice(upto); this.pendingMeta = this.pendingMeta.slice(upto);
      let i = 0;
      for (const ch of text) { this.push(ch, meta[i]); i += ch.length; }
    }

    push(ch, meta) { this.out.text += ch; this.out.probs.push(meta[0]); this.out.tops.push(meta[1]); }

    // Work for about `ms` milliseconds; true when finished.
    run(ms) {
      const model = this.model, end = Date.now() + ms, n = this.opts.n, vocab = this.vocab;
      while (!this.done) {
        for (let k = 0; k < 16 && !this.done; k++) {
          if (this.read < this.ids.length) { // the prime (or the start character)
            model.step(this.ids[this.read++]);
            if (this.read === this.ids.length && n === 0) this.done = true;
            continue;
          }
          const u = this.picker.greedy ? 0 : uniform(this.opts.seed_lo, this.opts.seed_hi, this.t);
          for (const x of model.logits) if (!Number.isFinite(x)) throw new Error("the model produced non-finite values (inf or NaN) while sampling; the checkpoint's weights are out of range");
          const id = this.picker.pick(model.logits, u);
          const tops = this.picker.top(5).map(([v, p]) => [vocab[v], p]);
          this.emit(vocab[id], [this.picker.prob, tops]);
          this.t++;
          if (this.t >= n) { this.done = true; break; }
          if (!this.done) model.step(id);
        }
        if (Date.now() >= end) break;
      }
      if (this.done && this.pending) this.flushPending(this.pending.length);
      return this.done;
    }

    // The characters made since the last call.
    take() { const o = this.out; this.out = { text: "", probs: [], tops: [] }; return o; }
  }

  return { Model, Job, Picker, uniform, decode };
})();

// In a worker: load once, then run jobs; a new "run" or a "stop" replaces the current one.
if (typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope) {
  let model = null, vocab = null, job = null, jobId = 0;
  const slice = () => {
    if (!job) return;
    const j = job, id = jobId;
    try {
      const finished = j.run(40);
      const chunk = j.take();
      if (chunk.text) self.postMessage({ type: "chunk", id, ...chunk });
      if (finished) { job = null; self.postMessage({ type: "done", id }); } else setTimeout(slice, 0);
    } catch (e) {
      job = null; self.postMessage({ type: "error", id, message: String(e && e.message || e) });
    }
  };
  self.onmessage = (ev) => {
    const m = ev.data;
    if (m.type === "load") {
      try { model = new CharnnModel.Model(m.meta, new Uint8Array(m.bytes)); vocab = m.meta.vocab; self.postMessage({ type: "ready" }); }
      catch (e) { self.postMessage({ type: "fail", message: String(e && e.message || e) }); }
    } else if (m.type === "run") {
      const fresh = !job;
      job = new CharnnModel.Job(model, vocab, m.opts); jobId = m.id;
      if (fresh) setTimeout(slice, 0);
    } else if (m.type === "stop") {
      job = null;
    }
  };
}
