// A small line chart, drawn by hand in SVG: a few series over a sliding time window.

const SVG = "http://www.w3.org/2000/svg";

export class Chart {
  constructor(svg, { windowMs, series }) {
    this.svg = svg;
    this.windowMs = windowMs;
    this.series = series; // [{key, className}]
    this.samples = []; // {at, values: {key: number}}, oldest first
  }

  draw(now, samples) {
    this.samples = samples.filter((s) => s.at >= now - this.windowMs);
    // Drawn at the element's own size, so that text is never stretched.
    const width = this.svg.clientWidth || 600;
    const height = this.svg.clientHeight || 220;
    this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const pad = { left: 40, right: 8, top: 8, bottom: 18 };
    const top = Math.max(1, ...this.samples.flatMap((s) => Object.values(s.values)));
    const x = (at) => pad.left + ((at - (now - this.windowMs)) / this.windowMs) * (width - pad.left - pad.right);
    const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);

    this.svg.replaceChildren();
    this.line(pad.left, y(0), width - pad.right, y(0), "axis");
    this.line(pad.left, y(top), pad.left, y(0), "axis");
    this.text(pad.left - 6, y(top) + 4, String(top), "end");
    this.text(pad.left - 6, y(0), "0", "end");
    this.text(pad.left, height - 2, `${Math.round(this.windowMs / 60000)} min ago`, "start");
    this.text(width - pad.right, height - 2, "now", "end");
    for (const { key, className } of this.series) {
      const samples = this.samples.filter((s) => key in s.values);
      if (!samples.length) continue;
      // Each value holds until the next sample: draw steps, and carry the last one to now.
      const points = [];
      samples.forEach((s, i) => {
        const next = i + 1 < samples.length ? samples[i + 1].at : now;
        points.push(`${x(s.at).toFixed(1)},${y(s.values[key]).toFixed(1)}`);
        points.push(`${x(next).toFixed(1)},${y(s.values[key]).toFixed(1)}`);
      });
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.join(" "));
      line.setAttribute("class", className);
      this.svg.append(line);
    }
  }

  line(x1, y1, x2, y2, className) {
    const line = document.createElementNS(SVG, "line");
    for (const [name, value] of Object.entries({ x1, y1, x2, y2 })) line.setAttribute(name, value);
    line.setAttribute("class", className);
    this.svg.append(line);
  }

  text(x, y, content, anchor) {
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("x", x);
    text.setAttribute("y", y);
    text.setAttribute("text-anchor", anchor);
    text.textContent = content;
    this.svg.append(text);
  }
}
