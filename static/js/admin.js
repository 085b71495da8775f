// The operator console: create and restock products, and watch stock and holds live.

import { ApiError, clock, parseTime, request, sentenceFor } from "./api.js";
import { Chart } from "./chart.js";
import { LiveFeed } from "./live.js";
import { formatDuration } from "./format.js";

const formatPrice = (price) => Number(price).toFixed(2);

const TOKEN_KEY = "flashsale.adminToken";
const REFRESH_MS = 2000;
const $ = (selector, root = document) => root.querySelector(selector);

class Console {
  constructor() {
    this.token = sessionStorage.getItem(TOKEN_KEY) || "";
    this.products = new Map(); // id → Product
    this.stats = new Map(); // id → Stats
    this.holds = [];
    this.history = new Map(); // product id → [{at, values: {available, held}}], last minutes
    this.selected = null;
    this.refreshing = false;
    this.refreshSoon = null;
    this.timers = [];
    this.chart = new Chart($("#chart"), {
      windowMs: 5 * 60_000,
      series: [
        { key: "available", className: "available" },
        { key: "held", className: "held" },
      ],
    });
    this.live = new LiveFeed({
      products: (list) => list.forEach((p) => this.products.set(p.id, p)),
      stock: () => this.scheduleRefresh(),
      product: (product) => {
        this.products.set(product.id, product);
        this.scheduleRefresh();
      },
      reservation: () => this.scheduleRefresh(),
      state: (state) => {
        const connection = $("#connection");
        connection.dataset.state = state;
        $(".label", connection).textContent =
          { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…", polling: "Updating every few seconds" }[state];
      },
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
    $("#stock-rows").addEventListener("submit", (event) => {
      event.preventDefault();
      this.restock(event.target);
    });
    $("#stock-rows").addEventListener("click", (event) => {
      if (event.target.closest("form")) return;
      const row = event.target.closest("tr");
      if (row) this.select(Number(row.dataset.id));
    });
    $("#stock-rows").addEventListener("keydown", (event) => {
      const row = event.target.closest("tr");
      if (row && event.target === row && (event.key === "Enter" || event.key === " ")) {
        event.preventDefault();
        this.select(Number(row.dataset.id));
      }
    });
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
      await this.admin("GET", "/api/admin/stats");
    } catch (error) {
      const wrong = error instanceof ApiError && (error.status === 401 || error.status === 404);
      this.showSignIn(wrong ? "That token is not the operator token." : sentenceFor(error));
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#signin").hidden = true;
    $("#console").hidden = false;
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

  async create(form) {
    const fields = form.elements;
    const body = {
      name: fields.name.value,
      price: Number(fields.price.value),
      stock: Number(fields.stock.value),
    };
    if (fields.saleStartsAt.value) body.saleStartsAt = new Date(fields.saleStartsAt.value).toISOString();
    const message = $("#create-message");
    try {
      const { data } = await this.admin("POST", "/api/admin/products", body);
      this.products.set(data.id, data);
      message.className = "message ok";
      message.textContent = `Created ${data.name} (id ${data.id}) with ${data.totalStock} units.`;
      form.reset();
      await this.refresh();
    } catch (error) {
      message.className = "message bad";
      message.textContent = this.explain(error);
    }
  }

  async restock(form) {
    const id = Number(form.closest("tr").dataset.id);
    const quantity = Number(form.elements.quantity.value);
    const message = $("#restock-message");
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

  explain(error) {
    if (error instanceof ApiError && error.status === 401) {
      this.showSignIn("Your operator token is no longer accepted; sign in again.");
    }
    return sentenceFor(error);
  }

  select(id) {
    this.selected = id;
    this.render();
  }

  // -- what the server says -------------------------------------------------------------

  scheduleRefresh() {
    if (this.refreshSoon) return;
    this.refreshSoon = setTimeout(() => {
      this.refreshSoon = null;
      this.refresh();
    }, 300);
  }

  async refresh() {
    if (this.refreshing || !this.token) return;
    this.refreshing = true;
    try {
      const [{ data: stats }, { data: holds }, { data: products }] = await Promise.all([
        this.admin("GET", "/api/admin/stats"),
        this.admin("GET", "/api/admin/reservations?status=ACTIVE&limit=200"),
        request("GET", "/api/products"),
      ]);
      products.forEach((p) => this.products.set(p.id, p));
      this.stats = new Map(stats.map((s) => [s.productId, s]));
      this.holds = holds;
      if (this.selected === null && stats.length) this.selected = stats[0].productId;
      this.record(clock.now());
      this.render();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) this.explain(error);
    } finally {
      this.refreshing = false;
    }
  }

  record(now) {
    const horizon = now - this.chart.windowMs;
    for (const stats of this.stats.values()) {
      const samples = this.history.get(stats.productId) || [];
      samples.push({ at: now, values: { available: stats.available, held: stats.held } });
      while (samples.length && samples[0].at < horizon) samples.shift();
      this.history.set(stats.productId, samples);
    }
  }

  // -- the page ---------------------------------------------------------------------------

  render() {
    const rows = $("#stock-rows");
    const template = $("#stock-row");
    const seen = new Set();
    for (const stats of this.stats.values()) {
      const id = stats.productId;
      seen.add(String(id));
      let row = rows.querySelector(`tr[data-id="${id}"]`);
      if (!row) {
        row = template.content.firstElementChild.cloneNode(true);
        row.dataset.id = id;
        rows.append(row);
      }
      const product = this.products.get(id);
      const name = product ? `${product.name} (${formatPrice(product.price)})` : `Product ${id}`;
      $(".name", row).textContent = name;
      $("input", row).setAttribute("aria-label", `Units to add to ${product?.name || `product ${id}`}`);
      for (const key of ["total", "available", "held", "sold", "expired", "cancelled"]) {
        $(`.${key}`, row).textContent = stats[key].toLocaleString();
      }
      row.classList.toggle("selected", id === this.selected);
      row.setAttribute("aria-selected", String(id === this.selected));
    }
    for (const row of [...rows.children]) if (!seen.has(row.dataset.id)) row.remove();
    $("#chart-product").textContent = this.products.get(this.selected)?.name || "";
    this.renderHolds();
    this.chart.draw(clock.now(), this.history.get(this.selected) || []);
  }

  renderHolds() {
    const body = $("#hold-rows");
    const rows = this.holds.map((hold) => {
      const row = document.createElement("tr");
      row.dataset.expiresAt = hold.expiresAt;
      const cells = [
        hold.id.slice(0, 8) + "…",
        this.products.get(hold.productId)?.name || `Product ${hold.productId}`,
        String(hold.quantity),
        "",
      ];
      cells.forEach((text, index) => {
        const cell = document.createElement("td");
        cell.textContent = text;
        if (index >= 2) cell.className = "num";
        if (index === 3) cell.classList.add("left");
        row.append(cell);
      });
      return row;
    });
    body.replaceChildren(...rows);
    $("#holds-empty").hidden = rows.length > 0;
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
