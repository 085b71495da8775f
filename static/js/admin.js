// The operator console: every product's stock at a glance, the chosen product's details and
// actions, the active holds, and new products; live.

import { ApiError, api, clock, parseTime, request, sentenceFor } from "./api.js";
import { Chart } from "./chart.js";
import { renderConnection } from "./connection.js";
import { Money, formatCount, formatDuration, formatMoment, localZone } from "./format.js";
import { LiveFeed, older } from "./live.js";

const TOKEN_KEY = "flashsale.adminToken";
const REFRESH_MS = 2000;
// Rows of the stock table at a time: the console asks for these products' figures alone, so
// that a shop of 10,000 products costs it no more than one of 50.
const PAGE_SIZE = 50;
const $ = (selector, root = document) => root.querySelector(selector);
// A hold as the console names it: 8 characters of its id's random part (an id's first 8
// are the time it was made, alike for the holds of a moment; an id of 22 is all random).
const shortId = (id) => (id.length === 30 ? id.slice(8, 16) : id.slice(0, 8));

// A sale's start in the operator's zone and in UTC: "Tue, 1 Dec, 18:00 CET (17:00 UTC)".
function bothZones(ms) {
  const utc = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit",
    minute: "2-digit",
    timeZone: "UTC",
    timeZoneName: "short",
  }).format(new Date(ms));
  const local = formatMoment(ms);
  // The operator's zone is UTC at that moment: once is enough.
  if (new Date(ms).getTimezoneOffset() === 0) return { local, utc: "", text: local };
  // The same day in UTC, or say which.
  const sameDay = new Date(ms).toLocaleDateString(undefined, { timeZone: "UTC" }) ===
    new Date(ms).toLocaleDateString();
  const utcText = sameDay ? utc : formatMoment(ms, { timeZone: "UTC" });
  return { local, utc: utcText, text: `${local} (${utcText})` };
}

const SALE_WORDS = {
  "on-sale": "On sale",
  "sold-out": "Sold out",
  "all-held": "All held",
  paused: "Paused",
  ended: "Ended",
};

const QUEUE_WORDS = {
  off: "Off",
  fifo: "In order of arrival",
  random: "Random draw at the start",
};

// A product's waiting room, in words: "Random draw at the start, 1 admitted per unit".
function queueText(product) {
  if (!product?.queue || product.queue === "off") return "Off";
  const factor = product.admitFactor ?? 1;
  return `${QUEUE_WORDS[product.queue] || product.queue}, ${formatNumber(factor)} admitted per unit`;
}

function formatNumber(n) {
  return new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 }).format(n);
}

// A time as a datetime-local field holds it: the operator's wall clock, to the minute.
function localInput(ms) {
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

class Console {
  constructor() {
    this.token = sessionStorage.getItem(TOKEN_KEY) || "";
    this.money = new Money();
    this.products = new Map(); // id → Product
    this.stats = new Map(); // id → Stats: the page's products, and the chosen one
    this.shown = []; // the ids of the products in the table, newest first
    this.pages = [null]; // each page seen's `before` (null: the newest products)
    this.olderBefore = null; // the next page's `before`, when there are older products
    this.totals = null; // every product's figures, added up
    this.holds = [];
    this.rooms = new Map(); // product id → its waiting room's figures
    this.selected = null;
    // A button to take the focus once it shows ({ selector, id }): the one an action makes
    // its next (End makes Reopen) may still be hidden when the action returns, since the
    // page's clock can be a moment behind the server's that ended the sale.
    this.focusWhenShown = null;
    this.editing = null; // the product the edit form was filled from
    this.refreshing = false;
    this.refreshAgain = false; // a refresh asked for while one was under way
    this.refreshSoon = null;
    this.timers = [];
    this.chart = new Chart($("#chart"), {
      series: [
        { key: "available", className: "available", label: "available" },
        { key: "held", className: "held", label: "held" },
        { key: "sold", className: "sold", label: "sold" },
      ],
      readout: $("#chart-readout"),
      format: formatCount,
    });
    this.saleHistory = null; // the chosen product's history, as the server last gave it
    this.live = new LiveFeed({
      products: (list) => list.forEach((p) => this.products.set(p.id, p)),
      stock: () => this.scheduleRefresh(),
      product: (product) => {
        this.products.set(product.id, product);
        this.scheduleRefresh();
      },
      reservation: () => this.scheduleRefresh(),
      state: (state) => renderConnection($("#connection"), state, this.live.lastHeard),
    });

    $("#signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.signIn(event.target.elements.token.value.trim());
    });
    $("#signout").addEventListener("click", () => this.signOut());
    $("#create-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.create(event.target);
    });
    $("#restock-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.restock(event.target);
    });
    $("#reduce-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.reduce(event.target);
    });
    $("#edit-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.edit(event.target);
    });
    const editStart = $("#edit-form").elements.saleStartsAt;
    editStart.addEventListener("input", () =>
      this.previewStart(editStart.value, $("#edit-starts-preview")),
    );
    $("#edit").addEventListener("toggle", () => {
      if ($("#edit").open) this.fillEdit();
    });
    $("#pause").addEventListener("click", () => this.control("pause", "Paused reservations of"));
    $("#resume").addEventListener("click", () => this.control("resume", "Resumed reservations of"));
    $("#end-sale").addEventListener("click", () => this.control("end", "Ended the sale of"));
    $("#reopen").addEventListener("click", () => this.reopen());
    $("#hold-rows").addEventListener("click", (event) => {
      const button = event.target.closest("button.cancel-hold");
      if (button) this.askCancel(button.closest("tr").dataset.id);
    });
    $("#cancel-hold-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.cancelHold(event.target);
    });
    $("#keep-hold").addEventListener("click", () => this.closeCancel());
    $("#stock-newer").addEventListener("click", () => this.turnPage(-1));
    $("#stock-older").addEventListener("click", () => this.turnPage(1));
    $("#stock-rows").addEventListener("click", (event) => {
      const button = event.target.closest("button.choose");
      if (!button) return;
      this.select(Number(button.closest("tr").dataset.id));
      $("#detail-title").focus(); // the details are below the table: take the reader there
    });
    const startField = $("#create-form").elements.saleStartsAt;
    startField.addEventListener("input", () => this.previewStart(startField.value));
    $("#create-form .zone").textContent = `(optional; your time, ${localZone()})`;
    $("#edit-form .zone").textContent = `(empty: on sale now; your time, ${localZone()})`;
  }

  start() {
    if (this.token) this.signIn(this.token);
    else this.showSignIn("");
  }

  // -- the token ------------------------------------------------------------------------

  admin(method, path, body) {
    return request(method, path, { body, headers: { Authorization: `Bearer ${this.token}` } });
  }

  async signIn(token) {
    this.token = token;
    try {
      await this.admin("GET", "/api/admin/stats/totals");
    } catch (error) {
      const wrong = error instanceof ApiError && (error.status === 401 || error.status === 404);
      this.showSignIn(wrong ? "That token is not the operator token." : sentenceFor(error));
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#signin").hidden = true;
    $("#console").hidden = false;
    try {
      const { data: config } = await api.config();
      this.money = new Money(config.currency);
      $("#price-unit").textContent = `(${config.currency})`;
      $("#edit-form .price-unit").textContent = `(${config.currency})`;
    } catch {
      // The next refresh shows the prices with the default currency's format.
    }
    await this.refresh();
    this.live.start();
    this.timers.push(setInterval(() => this.refresh(), REFRESH_MS));
    this.timers.push(setInterval(() => this.tick(), 250));
  }

  showSignIn(message) {
    this.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    $("#console").hidden = true;
    $("#signin").hidden = false;
    $("#signin-message").textContent = message;
    $("#signin-form").elements.token.focus();
  }

  signOut() {
    this.timers.forEach(clearInterval);
    this.timers = [];
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  }

  // -- actions --------------------------------------------------------------------------

  // The start field is the operator's own wall-clock time (datetime-local has no zone):
  // say which, and what it is in UTC, before it is sent.
  previewStart(value, preview = $("#starts-preview")) {
    if (!value) {
      preview.textContent = "";
      return;
    }
    const ms = new Date(value).getTime();
    preview.textContent = Number.isFinite(ms) ? `Starts ${bothZones(ms).text}.` : "";
  }

  async create(form) {
    const fields = form.elements;
    const body = {
      name: fields.name.value,
      price: Number(fields.price.value),
      stock: Number(fields.stock.value),
    };
    if (fields.saleStartsAt.value) body.saleStartsAt = new Date(fields.saleStartsAt.value).toISOString();
    if (fields.maxPerShopper.value) body.maxPerShopper = Number(fields.maxPerShopper.value);
    if (fields.queue.value !== "off") {
      body.queue = fields.queue.value;
      body.admitFactor = Number(fields.admitFactor.value);
    }
    const message = $("#create-message");
    try {
      const { data } = await this.admin("POST", "/api/admin/products", body);
      this.products.set(data.id, data);
      message.className = "message ok";
      const room = data.queue && data.queue !== "off" ? ` and a waiting room (${queueText(data)})` : "";
      message.textContent = `Created ${data.name} (id ${data.id}) with ${data.totalStock} units${room}.`;
      form.reset();
      this.previewStart("");
      this.selected = data.id;
      await this.refresh();
    } catch (error) {
      message.className = "message bad";
      message.textContent = this.explain(error);
    }
  }

  async restock(form) {
    const id = this.selected;
    const quantity = Number(form.elements.quantity.value);
    const message = $("#detail-message");
    try {
      const { data } = await this.admin("POST", `/api/admin/products/${id}/restock`, { quantity });
      this.products.set(data.id, data);
      message.className = "message ok";
      message.textContent = `Added ${quantity} units of ${data.name}: ${data.availableStock} available now.`;
      form.reset();
      await this.refresh();
    } catch (error) {
      message.className = "message bad";
      message.textContent = this.explain(error);
    }
  }

  // -- the sale controls (the chosen product) -------------------------------------------

  // Says what happened in the product's details, or why not.
  say(text, ok = true) {
    const message = $("#detail-message");
    message.className = `message ${ok ? "ok" : "bad"}`;
    message.textContent = text;
  }

  async productAction(method, path, body) {
    const { data } = await this.admin(method, path, body);
    this.products.set(data.id, data);
    this.render(); // at once: a refresh already under way would not show it
    await this.refresh();
    return data;
  }

  async control(action, done) {
    const id = this.selected;
    try {
      const data = await this.productAction("POST", `/api/admin/products/${id}/${action}`);
      this.say(`${done} ${data.name}.`);
      // The button pressed may be hidden now (Pause becomes Resume): keep the reader there.
      const next = { pause: "#resume", resume: "#pause", end: "#reopen" }[action];
      if (next) this.focusOnceShown(next, id);
    } catch (error) {
      this.say(this.explain(error), false);
    }
  }

  // Focus `selector` now if it shows, else when a render of product `id` first shows it,
  // unless the reader has put the focus somewhere else since (still on the button pressed,
  // or on nothing because that button is hidden now, it has not moved).
  focusOnceShown(selector, id) {
    this.focusWhenShown = null;
    if (!$(selector).hidden) $(selector).focus();
    else this.focusWhenShown = { selector, id, from: document.activeElement };
  }

  async reopen() {
    const id = this.selected;
    try {
      const data = await this.productAction("PATCH", `/api/admin/products/${id}`, { saleEndsAt: null });
      this.say(`Reopened the sale of ${data.name}.`);
      this.focusOnceShown("#end-sale", id);
    } catch (error) {
      this.say(this.explain(error), false);
    }
  }

  async reduce(form) {
    const id = this.selected;
    const quantity = Number(form.elements.quantity.value);
    try {
      const data = await this.productAction("POST", `/api/admin/products/${id}/reduce`, { quantity });
      this.say(
        `Took ${formatCount(quantity)} units of ${data.name} away: ` +
          `${formatCount(data.availableStock)} available, ${formatCount(data.totalStock)} in all now.`,
      );
      form.reset();
    } catch (error) {
      this.say(this.explain(error), false);
    }
  }

  // The edit form starts from the product as it is now.
  fillEdit() {
    const product = this.products.get(this.selected);
    if (!product) return;
    const fields = $("#edit-form").elements;
    fields.name.value = product.name;
    fields.price.value = product.price.toFixed(2);
    fields.saleStartsAt.value = product.saleStartsAt ? localInput(parseTime(product.saleStartsAt)) : "";
    fields.maxPerShopper.value = product.maxPerShopper ?? "";
    fields.queue.value = product.queue || "off";
    fields.admitFactor.value = String(product.admitFactor ?? 1);
    this.previewStart(fields.saleStartsAt.value, $("#edit-starts-preview"));
    this.editing = this.selected;
  }

  async edit(form) {
    const id = this.selected;
    const fields = form.elements;
    const body = { name: fields.name.value, price: Number(fields.price.value) };
    body.saleStartsAt = fields.saleStartsAt.value
      ? new Date(fields.saleStartsAt.value).toISOString()
      : null;
    body.maxPerShopper = fields.maxPerShopper.value ? Number(fields.maxPerShopper.value) : null;
    body.queue = fields.queue.value;
    body.admitFactor = Number(fields.admitFactor.value);
    try {
      const data = await this.productAction("PATCH", `/api/admin/products/${id}`, body);
      const starts = data.saleStartsAt ? `starts ${bothZones(parseTime(data.saleStartsAt)).text}` : "on sale now";
      const limit = data.maxPerShopper ? `at most ${formatCount(data.maxPerShopper)} per customer` : "no limit per customer";
      const room = data.queue && data.queue !== "off" ? `, waiting room: ${queueText(data)}` : "";
      this.say(`Saved ${data.name}: ${this.money.text(data.price)}, ${starts}, ${limit}${room}.`);
      // Emptied, so that it is filled from the product again when it opens, and never shows
      // (or saves) what was typed before meanwhile.
      $("#edit-form").reset();
      this.editing = null;
      $("#edit").open = false;
      $("#edit summary").focus();
    } catch (error) {
      this.say(this.explain(error), false);
    }
  }

  // -- cancelling a shopper's hold -------------------------------------------------------

  askCancel(id) {
    const hold = this.holds.find((h) => h.id === id);
    if (!hold) return;
    const form = $("#cancel-hold-form");
    form.dataset.id = id;
    form.hidden = false;
    const name = this.products.get(hold.productId)?.name || `Product ${hold.productId}`;
    $("#cancel-hold-title").textContent = `Cancel hold ${shortId(id)}…: ${formatCount(hold.quantity)} × ${name}`;
    form.elements.reason.value = "";
    form.elements.reason.focus();
  }

  closeCancel() {
    const form = $("#cancel-hold-form");
    form.hidden = true;
    delete form.dataset.id;
    $("#holds-title").focus();
  }

  async cancelHold(form) {
    const id = form.dataset.id;
    const reason = form.elements.reason.value.trim();
    const message = $("#holds-message");
    try {
      const { data } = await this.admin(
        "POST",
        `/api/admin/reservations/${id}/cancel`,
        reason ? { reason } : undefined,
      );
      message.className = "message ok";
      message.textContent =
        `Cancelled hold ${shortId(id)}… (${formatCount(data.quantity)} × ${data.product.name}): ` +
        "the units are back on sale and the shopper has been told.";
      form.hidden = true;
      delete form.dataset.id;
      $("#holds-title").focus(); // the form is gone: the reader stays with the holds
      await this.refresh();
    } catch (error) {
      message.className = "message bad";
      message.textContent = this.explain(error);
    }
  }

  explain(error) {
    if (error instanceof ApiError && error.status === 401) {
      this.showSignIn("Your operator token is no longer accepted; sign in again.");
    }
    return sentenceFor(error);
  }

  select(id) {
    if (this.selected !== id) $("#detail-message").textContent = "";
    this.selected = id;
    this.render();
    this.loadHistory().then(() => this.render(), () => {});
  }

  // -- what the server says -------------------------------------------------------------

  scheduleRefresh() {
    if (this.refreshSoon) return;
    this.refreshSoon = setTimeout(() => {
      this.refreshSoon = null;
      this.refresh();
    }, 300);
  }

  // The next page of products (1: older), or the one before it (-1: newer).
  async turnPage(step) {
    if (step > 0 && this.olderBefore === null) return;
    if (step > 0) this.pages.push(this.olderBefore);
    else if (this.pages.length > 1) this.pages.pop();
    else return;
    const button = step > 0 ? "#stock-older" : "#stock-newer";
    await this.refresh(true);
    // The button pressed may be hidden now (the first or the last page): keep the reader on
    // the table.
    if ($(button).hidden) $("#stock-title").focus();
  }

  // One page of products (the products list, kept in the process: no query), then the
  // figures of those alone and of the chosen one, the active holds and the sums.
  async refresh(force = false) {
    if (!this.token) return;
    if (this.refreshing) {
      if (force) this.refreshAgain = true; // the page was turned meanwhile: once more after
      return;
    }
    this.refreshing = true;
    try {
      const before = this.pages[this.pages.length - 1];
      const listing = await request(
        "GET",
        `/api/products?limit=${PAGE_SIZE}${before === null ? "" : `&before=${before}`}`,
      );
      const products = listing.data;
      const next = /[?&]before=(\d+)/.exec(listing.headers?.get("Link") || "");
      const wanted = products.map((p) => p.id);
      if (this.selected !== null && !wanted.includes(this.selected)) wanted.push(this.selected);
      const [{ data: stats }, { data: holds }, { data: totals }] = await Promise.all([
        wanted.length
          ? this.admin("GET", `/api/admin/stats?ids=${wanted.join(",")}`)
          : Promise.resolve({ data: [] }),
        this.admin("GET", "/api/admin/reservations?status=ACTIVE&limit=200"),
        this.admin("GET", "/api/admin/stats/totals"),
      ]);
      if (before !== this.pages[this.pages.length - 1]) return; // turned meanwhile: again
      this.shown = products.map((p) => p.id).sort((a, b) => b - a); // the page is by id
      this.olderBefore = next ? Number(next[1]) : null;
      this.totals = totals;
      // A refresh under way when the operator acted may bring a product as it was before:
      // never go back to an older version of one (its buttons would flip back and the
      // focus on them be lost); one far below is the product taken back (`older`).
      products.forEach((p) => {
        const known = this.products.get(p.id);
        if (!known || !older(p.version, known.version)) this.products.set(p.id, p);
      });
      this.stats = new Map(stats.map((s) => [s.productId, s]));
      this.holds = holds;
      if (this.selected === null && this.shown.length) this.selected = this.shown[0];
      if (this.selected !== null && !this.products.has(this.selected)) {
        const { data: chosen } = await request("GET", `/api/products/${this.selected}`);
        this.products.set(chosen.id, chosen);
      }
      await Promise.all([this.loadHistory(), this.loadRooms()]);
      this.render();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) this.explain(error);
    } finally {
      this.refreshing = false;
      if (this.refreshAgain) {
        this.refreshAgain = false;
        this.refresh();
      }
    }
  }

  // The chosen product's history and figures, from the server: the whole sale, whenever
  // the console was opened.
  async loadHistory() {
    const id = this.selected;
    if (id === null || !this.stats.has(id)) return;
    try {
      const { data } = await this.admin("GET", `/api/admin/products/${id}/history`);
      if (this.selected === id) this.saleHistory = data;
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) throw error;
      // Drawn again at the next refresh.
    }
  }

  renderHistory() {
    const data = this.saleHistory;
    if (!data || data.productId !== this.selected) {
      this.chart.draw({ from: clock.now() - 60_000, to: clock.now(), samples: [] });
      for (const id of ["sell-through", "sell-out", "converted", "revenue"]) $(`#figure-${id}`).textContent = "…";
      return;
    }
    const from = parseTime(data.since);
    const to = parseTime(data.until);
    const samples = data.points.map((p) => ({
      at: parseTime(p.at),
      values: { available: p.available, held: p.held, sold: p.sold },
    }));
    this.chart.draw({ from, to, samples });
    const step = data.stepSeconds;
    const per = step < 60 ? `${step} s` : step < 3600 ? `${step / 60} min` : `${step / 3600} h`;
    $("#chart-range").textContent =
      `From ${formatMoment(from)} to now, a point every ${per}. Hover over the chart, or focus it and use the arrow keys, for the values.`;
    const last = data.points[data.points.length - 1];
    $("#chart-summary").textContent = last
      ? `Now ${formatCount(last.available)} available, ${formatCount(last.held)} held, ` +
        `${formatCount(last.sold)} sold of ${formatCount(last.total)}.`
      : "No movements yet.";
    const f = data.figures;
    const percent = (share) => new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 1 }).format(share);
    $("#figure-sell-through").textContent = percent(f.sellThrough);
    $("#figure-sell-out").textContent =
      f.timeToSellOutSeconds === null ? "Not sold out" : formatDuration(f.timeToSellOutSeconds * 1000);
    $("#figure-converted").textContent = f.holdsConverted === null ? "No hold has ended yet" : percent(f.holdsConverted);
    $("#figure-revenue").textContent = this.money.text(f.revenue);
  }

  // -- the page ---------------------------------------------------------------------------

  // A product's sale, in words: when it starts (both zones), or whether units are left.
  saleOf(product, stats) {
    const starts = product?.saleStartsAt ? parseTime(product.saleStartsAt) : null;
    const ends = product?.saleEndsAt ? parseTime(product.saleEndsAt) : null;
    if (ends !== null && ends <= clock.now()) return { state: "ended", starts, ends };
    if (starts !== null && starts > clock.now()) return { state: "scheduled", starts };
    if (product?.paused) return { state: "paused", starts };
    if (stats && stats.available === 0) return { state: stats.held > 0 ? "all-held" : "sold-out", starts };
    return { state: "on-sale", starts };
  }

  saleCell(cell, sale) {
    const words = SALE_WORDS;
    if (sale.state !== "scheduled") {
      cell.textContent = words[sale.state];
      return;
    }
    const { local, utc } = bothZones(sale.starts);
    const when = document.createElement("time");
    when.dateTime = new Date(sale.starts).toISOString();
    when.textContent = `Starts ${local}`;
    const inUtc = document.createElement("span");
    inUtc.className = "utc";
    inUtc.textContent = utc;
    cell.replaceChildren(when, inUtc);
  }

  render() {
    const rows = $("#stock-rows");
    const template = $("#stock-row");
    const seen = new Set();
    for (const id of this.shown) {
      const stats = this.stats.get(id);
      if (!stats) continue;
      seen.add(String(id));
      let row = rows.querySelector(`tr[data-id="${id}"]`);
      if (!row) {
        row = template.content.firstElementChild.cloneNode(true);
        row.dataset.id = id;
        rows.append(row);
      }
      const product = this.products.get(id);
      const name = product?.name || `Product ${id}`;
      const choose = $(".choose", row);
      choose.textContent = name;
      choose.setAttribute("aria-pressed", String(id === this.selected));
      this.saleCell($(".sale", row), this.saleOf(product, stats));
      for (const key of ["total", "available", "held", "sold", "expired", "cancelled"]) {
        $(`.${key}`, row).textContent = formatCount(stats[key]);
      }
      row.classList.toggle("selected", id === this.selected);
    }
    for (const row of [...rows.children]) if (!seen.has(row.dataset.id)) row.remove();
    // Newest first, as the page lists them; rows already in that order are left where they
    // are (moving one would take the focus off its button).
    const order = this.shown.filter((id) => seen.has(String(id))).map(String);
    if ([...rows.children].some((row, index) => row.dataset.id !== order[index])) {
      for (const id of order) rows.append(rows.querySelector(`tr[data-id="${id}"]`));
    }
    $("#stock-empty").hidden = seen.size > 0;
    this.renderPages();
    this.renderDetail();
    this.renderQueues();
    this.renderHolds();
  }

  // Which products the table shows, of how many; every product's figures added up.
  renderPages() {
    const t = this.totals;
    $("#stock-totals").textContent = t && t.products
      ? `All ${formatCount(t.products)} products: ${formatCount(t.available)} available + ` +
        `${formatCount(t.held)} held + ${formatCount(t.sold)} sold = ${formatCount(t.total)}; ` +
        `${formatCount(t.expired)} expired, ${formatCount(t.cancelled)} cancelled so far.`
      : "";
    const first = (this.pages.length - 1) * PAGE_SIZE;
    const several = this.pages.length > 1 || this.olderBefore !== null;
    $("#stock-pages").hidden = !several;
    $("#stock-newer").hidden = this.pages.length <= 1;
    $("#stock-older").hidden = this.olderBefore === null;
    $("#stock-range").textContent = this.shown.length
      ? `Products ${formatCount(first + 1)}–${formatCount(first + this.shown.length)}` +
        (t ? ` of ${formatCount(t.products)}` : "") + ", newest first"
      : "";
  }

  // -- the waiting rooms ------------------------------------------------------------------

  // The room's figures (GET /api/admin/products/{id}/queue, read with each refresh), or null.
  queueOf(stats) {
    const room = stats ? this.rooms.get(stats.productId) : null;
    if (!room) return null;
    return {
      waiting: room.waiting,
      admitted: room.admitted,
      passesUsed: room.reserved,
      passesLapsed: room.lapsed,
      admittedPerMinute: room.admittedLastMinute,
    };
  }

  // Every product with a queue: its room's figures, for the panel.
  async loadRooms() {
    // The page's products (and the chosen one): as many requests as the table has rows at most.
    const queued = [...this.stats.keys()]
      .map((id) => this.products.get(id))
      .filter((p) => p?.queue && p.queue !== "off");
    const answers = await Promise.all(
      queued.map((p) =>
        this.admin("GET", `/api/admin/products/${p.id}/queue`).then(
          ({ data }) => data,
          (error) => {
            if (error instanceof ApiError && error.status === 401) throw error;
            return this.rooms.get(p.id) ?? null; // shown as it was, read again next time
          },
        ),
      ),
    );
    this.rooms = new Map(answers.filter(Boolean).map((room) => [room.productId, room]));
  }

  queueFacts(product, stats) {
    const text = queueText(product);
    const q = this.queueOf(stats);
    if (!product?.queue || product.queue === "off" || !q) return text;
    return `${text} · ${formatCount(q.waiting)} waiting, ${formatCount(q.admitted)} admitted now`;
  }

  // Every product with a queue: its line, live (refreshed with the stats).
  renderQueues() {
    const body = $("#queue-rows");
    const rows = [];
    for (const stats of this.stats.values()) {
      const product = this.products.get(stats.productId);
      if (!product?.queue || product.queue === "off") continue;
      const q = this.queueOf(stats) || {};
      const row = document.createElement("tr");
      row.setAttribute("role", "row");
      row.dataset.id = stats.productId;
      const name = document.createElement("th");
      name.setAttribute("role", "rowheader");
      name.scope = "row";
      name.className = "name";
      name.textContent = product.name;
      row.append(name);
      const rate = q.admittedPerMinute;
      const cells = [
        ["Room", QUEUE_WORDS[product.queue] || product.queue, "mode"],
        ["Waiting", q.waiting, "waiting"],
        ["Admitted", q.admitted, "admitted"],
        ["Passes used", q.passesUsed, "used"],
        ["Lapsed", q.passesLapsed, "lapsed"],
        ["Admitted per minute", rate == null ? "–" : formatNumber(rate), "rate"],
      ];
      for (const [label, value, className] of cells) {
        const cell = document.createElement("td");
        cell.setAttribute("role", "cell");
        cell.dataset.label = label;
        cell.className = className === "mode" ? className : `num ${className}`;
        cell.textContent = typeof value === "number" ? formatCount(value) : value ?? "–";
        row.append(cell);
      }
      rows.push(row);
    }
    body.replaceChildren(...rows);
    $("#queues").hidden = rows.length === 0;
  }

  renderDetail() {
    const stats = this.stats.get(this.selected);
    const product = this.products.get(this.selected);
    $("#detail").hidden = !stats;
    if (!stats) return;
    $("#detail-name").textContent = product?.name || `Product ${this.selected}`;
    $("#detail-price").textContent = product ? this.money.text(product.price) : "";
    $("#detail-queue").textContent = this.queueFacts(product, stats);
    $("#detail-limit").textContent = product?.maxPerShopper
      ? `${formatCount(product.maxPerShopper)} (active and bought holds together)`
      : "None";
    const sale = this.saleOf(product, stats);
    let saleText = SALE_WORDS[sale.state];
    if (sale.state === "scheduled") saleText = `Starts ${bothZones(sale.starts).text}`;
    else if (sale.state === "ended") saleText = `Ended ${bothZones(sale.ends).text}`;
    else if (sale.starts !== null) saleText += `, since ${bothZones(sale.starts).text}`;
    $("#detail-sale").textContent = saleText;
    $("#detail-sale").className = `sale-state ${sale.state}`;
    const paused = Boolean(product?.paused);
    const ended = sale.state === "ended";
    $("#pause").hidden = paused || ended;
    $("#resume").hidden = !paused || ended;
    $("#end-sale").hidden = ended || sale.state === "scheduled";
    $("#reopen").hidden = !ended;
    const pending = this.focusWhenShown;
    if (pending && (pending.id !== this.selected || !$(pending.selector).hidden)) {
      this.focusWhenShown = null;
      const active = document.activeElement;
      const untouched =
        !active || active === document.body || active === pending.from || active.closest("[hidden]");
      if (pending.id === this.selected && untouched) $(pending.selector).focus();
    }
    $("#reduce-hint").textContent =
      `At most ${formatCount(stats.available)} can be taken away: held and sold units stay.`;
    $("#reduce-form input").setAttribute("aria-label", `Units to take away from ${product?.name || ""}`);
    if (this.editing !== this.selected && $("#edit").open) this.fillEdit();
    $("#detail-now").textContent =
      `${formatCount(stats.available)} available + ${formatCount(stats.held)} held + ` +
      `${formatCount(stats.sold)} sold = ${formatCount(stats.total)}`;
    $("#detail-so-far").textContent =
      `${formatCount(stats.expired)} expired, ${formatCount(stats.cancelled)} cancelled`;
    $("#restock-form input").setAttribute("aria-label", `Units to add to ${product?.name || ""}`);
    this.renderHistory();
  }

  renderHolds() {
    const body = $("#hold-rows");
    const focused = body.contains(document.activeElement)
      ? document.activeElement.closest("tr")?.dataset.id
      : null;
    const rows = this.holds.map((hold) => {
      const row = document.createElement("tr");
      row.setAttribute("role", "row");
      row.dataset.expiresAt = hold.expiresAt;
      row.dataset.id = hold.id;
      const cells = [
        ["Hold", `${shortId(hold.id)}…`],
        [
          "Product",
          this.products.get(hold.productId)?.name || hold.product?.name || `Product ${hold.productId}`,
        ],
        ["Units", formatCount(hold.quantity)],
        ["Time left", ""],
        ["", ""],
      ];
      cells.forEach(([label, text], index) => {
        const cell = document.createElement("td");
        cell.setAttribute("role", "cell");
        cell.dataset.label = label;
        cell.textContent = text;
        if (index === 0) cell.title = hold.id;
        if (index >= 2) cell.className = "num";
        if (index === 3) cell.classList.add("left");
        if (index === 4) {
          cell.className = "act";
          delete cell.dataset.label;
          const button = document.createElement("button");
          button.type = "button";
          button.className = "cancel-hold secondary small danger";
          button.textContent = "Cancel…";
          button.setAttribute("aria-label", `Cancel hold ${shortId(hold.id)}`);
          cell.append(button);
        }
        row.append(cell);
      });
      return row;
    });
    body.replaceChildren(...rows);
    if (focused) body.querySelector(`tr[data-id="${focused}"] button`)?.focus();
    $("#holds-empty").hidden = rows.length > 0;
    // A hold that ended while the operator was about to cancel it: say so, and close.
    const asked = $("#cancel-hold-form").dataset.id;
    if (asked && !this.holds.some((h) => h.id === asked)) {
      $("#cancel-hold-form").hidden = true;
      delete $("#cancel-hold-form").dataset.id;
      $("#holds-message").className = "message";
      $("#holds-message").textContent = `Hold ${shortId(asked)}… has ended already.`;
    }
    this.tick();
  }

  tick() {
    const now = clock.now();
    for (const row of $("#hold-rows").children) {
      $(".left", row).textContent = formatDuration(parseTime(row.dataset.expiresAt) - now);
    }
  }
}

new Console().start();
