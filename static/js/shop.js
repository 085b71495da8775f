// The shop page: products with live stock, reserving, and the shopper's holds.

import { ApiError, api, clock, parseTime, sentenceFor } from "./api.js";
import { LiveFeed } from "./live.js";
import { ShopView, formatDuration } from "./shop-view.js";

const HOLDS_KEY = "flashsale.holds"; // ids of this browser's holds, kept across reloads
const TICK_MS = 250;

function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

class Shop {
  constructor(view) {
    this.view = view;
    this.products = new Map(); // id → Product, the newest version seen
    this.holds = new Map(); // id → Reservation
    this.tentative = new Set(); // holds whose time is up, before the server has said so
    this.unresolved = new Set(); // stored ids we could not look up this time
    this.announced = new Map(); // hold id → the last reminder announced
    this.pausedUntil = 0; // Date.now() until which the server asked us not to reserve
    this.live = new LiveFeed({
      products: (list) => list.forEach((p) => this.applyProduct(p)),
      stock: (frame) => this.applyStock(frame),
      product: (product) => this.applyProduct(product),
      reservation: (reservation) => this.applyReservation(reservation),
      state: (state) => this.view.render("connection", state),
    });
    view.bind("reserve", (productId, quantity) => this.reserve(productId, quantity));
    view.bind("complete", (id) => this.act(id, api.complete));
    view.bind("cancel", (id) => this.act(id, api.cancel));
    view.bind("dismiss", (id) => this.dismiss(id));
  }

  async start() {
    try {
      const { data: config } = await api.config();
      this.view.render("config", config);
      const { data: products } = await api.products();
      products.forEach((p) => this.applyProduct(p));
      this.view.render("products", products);
    } catch (error) {
      this.view.render("notice", sentenceFor(error));
    }
    await this.restoreHolds();
    this.live.start();
    this.live.watch(this.activeHoldIds());
    setInterval(() => this.tick(), TICK_MS);
    this.tick();
  }

  // -- what the server says --------------------------------------------------------------

  applyProduct(product) {
    const known = this.products.get(product.id);
    if (known && known.version > product.version) return;
    const changed = Boolean(known) && known.availableStock !== product.availableStock;
    this.products.set(product.id, product);
    this.view.render("product", { product, changed });
  }

  applyStock({ productId, availableStock, version }) {
    const known = this.products.get(productId);
    if (!known || known.version >= version) return;
    this.applyProduct({ ...known, availableStock, version });
  }

  applyReservation(reservation) {
    if (reservation.product) this.applyProduct(reservation.product);
    const known = this.holds.get(reservation.id);
    if (!known) return;
    const settled = reservation.status !== "ACTIVE";
    if (settled) this.tentative.delete(reservation.id);
    this.holds.set(reservation.id, reservation);
    this.renderHold(reservation);
    if (settled && known.status === "ACTIVE") {
      this.announce(reservation);
      this.live.watch(this.activeHoldIds());
    }
  }

  // -- what the shopper does ----------------------------------------------------------------

  async reserve(productId, quantity) {
    const key = randomKey(); // the same key if we retry: never two holds for one click
    this.view.render("productError", { id: productId, message: null });
    this.view.render("productBusy", { id: productId, busy: true });
    try {
      let response;
      try {
        response = await api.reserve(productId, quantity, key);
      } catch (error) {
        if (error instanceof ApiError) throw error;
        response = await api.reserve(productId, quantity, key); // the network blinked
      }
      const reservation = response.data;
      this.holds.set(reservation.id, reservation);
      this.saveHolds();
      this.applyProduct(reservation.product);
      this.renderHold(reservation);
      this.live.watch(this.activeHoldIds());
      const left = formatDuration(parseTime(reservation.expiresAt) - clock.now());
      this.view.render(
        "announce",
        `Held ${reservation.quantity} of ${reservation.product.name} for ${left}.`,
      );
    } catch (error) {
      this.view.render("productError", { id: productId, message: sentenceFor(error) });
      if (error instanceof ApiError && (error.status === 429 || error.status === 503)) {
        // Asked to wait: no reserve button works until then (a busy shop is not helped
        // by every page clicking again at once).
        const seconds = Number(error.retryAfter) > 0 ? Number(error.retryAfter) : 2;
        this.pausedUntil = Date.now() + seconds * 1000;
      }
    } finally {
      this.view.render("productBusy", { id: productId, busy: false });
      this.tick();
    }
  }

  async act(id, action) {
    this.view.render("holdError", { id, message: null });
    this.view.render("holdBusy", { id, busy: true });
    try {
      const { data } = await action(id);
      this.applyReservation(data);
    } catch (error) {
      this.view.render("holdError", { id, message: sentenceFor(error) });
      if (error instanceof ApiError && error.status === 409) await this.refreshHold(id);
    } finally {
      this.view.render("holdBusy", { id, busy: false });
    }
  }

  dismiss(id) {
    this.holds.delete(id);
    this.tentative.delete(id);
    this.saveHolds();
    this.view.render("removeHold", id);
  }

  // -- holds across reloads ---------------------------------------------------------------

  async restoreHolds() {
    let ids = [];
    try {
      ids = JSON.parse(localStorage.getItem(HOLDS_KEY) || "[]");
    } catch {
      ids = [];
    }
    for (const id of ids) {
      try {
        const { data } = await api.reservation(id);
        this.holds.set(id, data);
        this.applyProduct(data.product);
        this.renderHold(data);
      } catch (error) {
        // Gone (404): forget it. Not reachable now: keep the id for the next visit.
        if (!(error instanceof ApiError && error.status === 404)) this.unresolved.add(id);
      }
    }
    this.saveHolds();
  }

  saveHolds() {
    const ids = [...this.holds.keys(), ...this.unresolved];
    localStorage.setItem(HOLDS_KEY, JSON.stringify(ids));
  }

  async refreshHold(id) {
    try {
      const { data } = await api.reservation(id);
      this.applyReservation(data);
    } catch {
      // The socket or the next poll will tell.
    }
  }

  activeHoldIds() {
    return [...this.holds.values()].filter((r) => r.status === "ACTIVE").map((r) => r.id);
  }

  // -- time ---------------------------------------------------------------------------------

  tick() {
    const now = clock.now();
    for (const reservation of this.holds.values()) {
      if (reservation.status !== "ACTIVE" || this.tentative.has(reservation.id)) continue;
      const left = parseTime(reservation.expiresAt) - now;
      if (left <= 0) {
        // Its time is up: say so now, and let the server confirm.
        this.tentative.add(reservation.id);
        this.renderHold(reservation);
        this.view.render("announce", `Your hold of ${this.nameOf(reservation)} expired.`);
        this.refreshHold(reservation.id);
      } else {
        this.remind(reservation, left);
      }
    }
    this.view.render("tick", { now, paused: Date.now() < this.pausedUntil });
  }

  remind(reservation, left) {
    for (const mark of [60_000, 30_000, 10_000]) {
      if (left <= mark && (this.announced.get(reservation.id) ?? Infinity) > mark) {
        this.announced.set(reservation.id, mark);
        this.view.render(
          "announce",
          `${Math.round(mark / 1000)} seconds left to buy ${this.nameOf(reservation)}.`,
        );
        return;
      }
    }
  }

  announce(reservation) {
    const name = this.nameOf(reservation);
    const sentences = {
      COMPLETED: `You bought ${reservation.quantity} of ${name}.`,
      CANCELLED: `Your hold of ${name} was cancelled.`,
      EXPIRED: `Your hold of ${name} expired; the units went back on sale.`,
    };
    this.view.render("announce", sentences[reservation.status] || "");
  }

  renderHold(reservation) {
    this.view.render("hold", {
      reservation,
      name: this.nameOf(reservation),
      tentative: this.tentative.has(reservation.id),
    });
  }

  nameOf(reservation) {
    return reservation.product?.name || this.products.get(reservation.productId)?.name || "";
  }
}

new Shop(new ShopView()).start();
