// A small line chart, drawn by hand in SVG: a product's units over a range of time, with
// axes that say what they measure and, on hover, the values at that moment.

const SVG = "http://www.w3.org/2000/svg";

// Ticks at round numbers: 0 … top, about `count` of them.
function niceTicks(top, count = 4) {
  if (top <= 0) return [0];
  const rough = top / count;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough) || magnitude * 10;
  const ticks = [];
  for (let v = 0; v <= top + step / 2; v += step) ticks.push(Math.round(v));
  return ticks;
}

// Time ticks at round steps: seconds, minutes, hours or days.
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400].map(
  (s) => s * 1000,
);

function timeTicks(from, to, count = 4) {
  const step = TIME_STEPS.find((s) => (to - from) / s <= count) || TIME_STEPS[TIME_STEPS.length - 1];
  const offset = new Date(from).getTimezoneOffset() * 60_000; // round in the operator's zone
  const ticks = [];
  for (let t = Math.ceil((from - offset) / step) * step + offset; t <= to; t += step) ticks.push(t);
  return { ticks, step };
}

function timeLabel(ms, step) {
  const options = step >= 86_400_000
    ? { day: "numeric", month: "short" }
    : step >= 60_000
      ? { hour: "2-digit", minute: "2-digit" }
      : { hour: "2-digit", minute: "2-digit", second: "2-digit" };
  return new Intl.DateTimeFormat(undefined, options).format(new Date(ms));
}

export class Chart {
  // `series`: [{key, className, label}]; `readout`: the element that says the values under
  // the pointer; `format`: a value → text.
  constructor(svg, { series, readout, format = String }) {
    this.svg = svg;
    this.series = series;
    this.readout = readout;
    this.format = format;
    this.samples = []; // {at, values: {key: number}}, oldest first
    this.view = null;
    this.index = null; // the point the keyboard reads, if any
    svg.addEventListener("pointermove", (event) => this.hover(event));
    svg.addEventListener("pointerleave", () => this.hover(null));
    // The keyboard reads the same values: ← and → step through the points, Home and End.
    svg.addEventListener("focus", () => this.step(this.samples.length - 1));
    svg.addEventListener("blur", () => this.hover(null));
    svg.addEventListener("keydown", (event) => {
      const moves = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity };
      if (!(event.key in moves)) return;
      event.preventDefault();
      const last = this.samples.length - 1;
      const move = moves[event.key];
      const at = Number.isFinite(move) ? (this.index ?? last) + move : move < 0 ? 0 : last;
      this.step(Math.max(0, Math.min(last, at)));
    });
  }

  // Shows the values of the `index`-th point, its guide at the point's time.
  step(index) {
    if (!this.view || !this.samples.length) return;
    this.index = index;
    this.show(this.samples[index], this.view.x(Math.max(this.samples[index].at, this.view.from)));
  }

  // Draws `samples` over [from, to] (ms). Each value holds until the next sample.
  draw({ from, to, samples }) {
    this.samples = samples;
    const width = this.svg.clientWidth || 600;
    const height = this.svg.clientHeight || 240;
    this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const pad = { left: 52, right: 12, top: 24, bottom: 34 };
    const highest = Math.max(1, ...samples.flatMap((s) => this.series.map(({ key }) => s.values[key] ?? 0)));
    const yTicks = niceTicks(highest);
    const top = Math.max(highest, yTicks[yTicks.length - 1]);
    const span = Math.max(1, to - from);
    const x = (at) => pad.left + ((at - from) / span) * (width - pad.left - pad.right);
    const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
    this.view = { from, to, x, y, pad, width, height };

    this.svg.replaceChildren();
    for (const v of yTicks) {
      this.line(pad.left, y(v), width - pad.right, y(v), v === 0 ? "axis" : "grid");
      this.text(pad.left - 6, y(v) + 4, this.format(v), "end");
    }
    this.line(pad.left, y(top), pad.left, y(0), "axis");
    this.text(4, 12, "Units", "start", "axis-title");
    const { ticks, step } = timeTicks(from, to, width < 500 ? 3 : 5);
    for (const t of ticks) {
      this.line(x(t), y(0), x(t), y(0) + 4, "axis");
      this.text(x(t), height - pad.bottom + 16, timeLabel(t, step), "middle");
    }
    this.text(width - pad.right, height - 2, "Time (your clock)", "end", "axis-title");
    for (const { key, className } of this.series) {
      if (!samples.length) continue;
      const points = [];
      samples.forEach((s, i) => {
        const next = i + 1 < samples.length ? samples[i + 1].at : to;
        const value = s.values[key] ?? 0;
        points.push(`${x(Math.max(s.at, from)).toFixed(1)},${y(value).toFixed(1)}`);
        points.push(`${x(next).toFixed(1)},${y(value).toFixed(1)}`);
      });
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.join(" "));
      line.setAttribute("class", className);
      this.svg.append(line);
    }
    this.guide = this.line(0, pad.top, 0, y(0), "guide");
    this.guide.style.display = "none";
    if (document.activeElement === this.svg && this.index !== null) {
      this.step(Math.min(this.index, samples.length - 1));
    }
  }

  // The sample in effect at the pointer: its time and values, said beside the chart.
  hover(event) {
    if (!this.view || !this.samples.length || !event) {
      if (this.guide) this.guide.style.display = "none";
      if (this.readout) this.readout.textContent = "";
      return;
    }
    const box = this.svg.getBoundingClientRect();
    const { from, to, pad, width } = this.view;
    const px = ((event.clientX - box.left) / box.width) * width;
    const at = from + ((px - pad.left) / (width - pad.left - pad.right)) * (to - from);
    if (at < from || at > to) return this.hover(null);
    let found = null;
    for (const s of this.samples) {
      if (s.at <= at) found = s;
      else break;
    }
    if (!found) return this.hover(null);
    this.show(found, px);
    return undefined;
  }

  show(sample, px) {
    this.guide.setAttribute("x1", px);
    this.guide.setAttribute("x2", px);
    this.guide.style.display = "";
    const when = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })
      .format(new Date(sample.at));
    const values = this.series.map(({ key, label }) => `${label} ${this.format(sample.values[key] ?? 0)}`);
    this.readout.textContent = `${when}: ${values.join(", ")}`;
  }

  line(x1, y1, x2, y2, className) {
    const line = document.createElementNS(SVG, "line");
    for (const [name, value] of Object.entries({ x1, y1, x2, y2 })) line.setAttribute(name, value);
    line.setAttribute("class", className);
    this.svg.append(line);
    return line;
  }

  text(x, y, content, anchor, className) {
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("x", x);
    text.setAttribute("y", y);
    text.setAttribute("text-anchor", anchor);
    if (className) text.setAttribute("class", className);
    text.textContent = content;
    this.svg.append(text);
  }
}
