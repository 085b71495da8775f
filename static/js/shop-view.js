// The shop page's DOM. Two doors: bind(event, handler) and render(command, data).
// Every value from the server reaches the page through textContent or an attribute, never
// as HTML.

import { renderConnection } from "./connection.js";
import { Money, formatCount, formatDuration, formatIn, formatMoment } from "./format.js";

const $ = (selector, root = document) => root.querySelector(selector);

const OUTCOMES = {
  COMPLETED: "Purchased. Thank you!",
  CANCELLED: "Cancelled: the units are back on sale.",
  EXPIRED: "This hold expired: its units went back on sale.",
};

// How a hold ended, in the hold bar. A hold the shop cancelled says so, with its reason.
export function outcomeOf(reservation) {
  if (reservation.status === "CANCELLED" && reservation.cancelledBy === "operator") {
    const reason = reservation.cancelReason ? `: ${reservation.cancelReason}` : "";
    return `Cancelled by the shop${reason}. The units are back on sale.`;
  }
  return OUTCOMES[reservation.status] || reservation.status;
}

const BUSY_LABELS = { complete: "Processing…", cancel: "Cancelling…" };
const IDLE_LABELS = { complete: "Complete purchase", cancel: "Cancel" };

// Keeps `variable` on the root at `element`'s height: the stylesheet's scroll padding uses
// it, so that what the keyboard focuses is never hidden under a sticky bar.
export function keepClear(element, variable) {
  const root = document.documentElement;
  new ResizeObserver(() => {
    root.style.setProperty(variable, `${element.offsetHeight}px`);
  }).observe(element);
}

export class ShopView {
  constructor() {
    this.onSale = $("#products");
    this.soon = $("#soon");
    this.soonSection = $("#soon-section");
    this.holds = $("#holds");
    this.holdsSection = $("#holds-section");
    this.holdsToggle = $("#holds-toggle");
    this.connection = $("#connection");
    this.notice = $("#notice");
    this.announcer = $("#announcer");
    this.productTemplate = $("#product-template");
    this.holdTemplate = $("#hold-template");
    this.handlers = {};
    this.money = new Money();
    this.stale = false;
    this.loaded = false;

    for (const list of [this.onSale, this.soon]) {
      list.addEventListener("submit", (event) => {
        event.preventDefault();
        const card = event.target.closest(".product");
        const quantity = Number(event.target.elements.quantity.value);
        this.handlers.reserve?.(Number(card.dataset.id), quantity);
      });
    }
    this.holds.addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) return;
      const id = button.closest(".hold").dataset.id;
      for (const action of ["complete", "cancel", "dismiss"]) {
        if (button.classList.contains(action)) this.handlers[action]?.(id);
      }
    });
    this.holdsToggle.addEventListener("click", () => {
      this.expandHolds(this.holdsToggle.getAttribute("aria-expanded") !== "true");
    });
    keepClear($(".masthead"), "--head-height");
    keepClear(this.holdsSection, "--foot-height");
  }

  bind(event, handler) {
    this.handlers[event] = handler;
  }

  render(command, data) {
    switch (command) {
      case "config":
        this.money = new Money(data.currency);
        break;
      case "products":
        this.loaded = true;
        $("#loading").hidden = true;
        this.showEmpty();
        break;
      case "morePages": {
        const more = $("#more-products");
        more.hidden = !data;
        if (data) more.querySelector("a").href = data;
        break;
      }
      case "product":
        this.renderProduct(data);
        break;
      case "hold":
        this.renderHold(data);
        break;
      case "focusHold":
        this.focusHold(data);
        break;
      case "removeHold":
        this.holdItem(data)?.remove();
        this.holdsSection.hidden = !this.holds.children.length;
        break;
      case "tick":
        this.tick(data);
        break;
      case "connection":
        this.renderConnection(data);
        break;
      case "productBusy":
        this.setProductBusy(this.productCard(data.id), data.busy);
        break;
      case "holdBusy":
        this.setHoldBusy(this.holdItem(data.id), data.action);
        break;
      case "productError":
        this.showError(this.productCard(data.id), data.message);
        break;
      case "holdError":
        this.showError(this.holdItem(data.id), data.message);
        break;
      case "notice":
        this.notice.textContent = data || "";
        this.notice.hidden = !data;
        break;
      case "announce":
        this.announcer.textContent = data;
        break;
      default:
        throw new Error(`unknown render command ${command}`);
    }
  }

  productCard(id) {
    return document.querySelector(`.product[data-id="${CSS.escape(String(id))}"]`);
  }

  holdItem(id) {
    return this.holds.querySelector(`[data-id="${CSS.escape(id)}"]`);
  }

  // -- products -------------------------------------------------------------------------

  // `max`: the most units this shopper can ask for now (0: none); `mine`: the units of it
  // this shopper holds; `has`: the units of it this shopper has held or bought, which count
  // against `product.maxPerShopper`; `now`: the server's time, to tell on sale from coming
  // soon.
  renderProduct({ product, changed = false, max, mine, has = 0, now }) {
    let card = this.productCard(product.id);
    if (!card) {
      card = this.productTemplate.content.firstElementChild.cloneNode(true);
      card.dataset.id = product.id;
      const nameId = `product-${product.id}-name`;
      $(".name", card).id = nameId;
      card.setAttribute("aria-labelledby", nameId);
      $(".meter", card).setAttribute("aria-labelledby", nameId);
      $(".stale-note", card).hidden = !this.stale;
    }
    $(".name", card).textContent = product.name;
    $(".price", card).textContent = this.money.text(product.price);

    const left = product.availableStock;
    const held = product.heldStock ?? 0; // units that may come back (when the server says)
    const total = formatCount(product.totalStock);
    let count = `${formatCount(left)} of ${total} left`;
    if (left <= 0) count = held > 0 ? `All reserved — ${formatCount(held)} may come back` : "Sold out";
    $(".count", card).textContent = count;
    const meter = $(".meter", card);
    meter.setAttribute("aria-valuemax", String(product.totalStock));
    meter.setAttribute("aria-valuenow", String(left));
    meter.setAttribute("aria-valuetext", left > 0 ? count : `${count}: 0 of ${total} left`);
    const share = product.totalStock ? left / product.totalStock : 0;
    $(".fill", card).style.width = `${Math.round(share * 100)}%`;
    card.classList.toggle("sold-out", left <= 0);
    card.classList.toggle("all-reserved", left <= 0 && held > 0);

    this.setQuantities($("select", card), max);
    const limit = $(".limit", card);
    const cap = product.maxPerShopper;
    limit.hidden = !cap;
    if (cap) {
      const yoursNow = has >= cap ? `you have ${formatCount(has)}, the most you can` : `you have ${formatCount(has)}`;
      limit.textContent = `Limit ${formatCount(cap)} per customer · ${yoursNow}`;
    }
    const yours = $(".yours", card);
    yours.hidden = !mine;
    yours.textContent = mine ? `You hold ${formatCount(mine)} of these (see Your holds).` : "";

    const startsAt = product.saleStartsAt ? Date.parse(product.saleStartsAt) : null;
    card.dataset.startsAt = startsAt ?? "";
    // The operator's controls: reservations paused, or the sale ended (at a time the tick
    // compares with the corrected clock).
    card.dataset.paused = String(Boolean(product.paused));
    card.dataset.endsAt = product.saleEndsAt ? Date.parse(product.saleEndsAt) : "";
    this.renderClosed(card, now);
    const time = $(".starts-at", card);
    if (startsAt !== null) {
      time.dateTime = product.saleStartsAt;
      time.textContent = `Starts ${formatMoment(startsAt)}`;
    }
    this.place(card, now);
    if (changed) {
      card.classList.remove("changed");
      void card.offsetWidth; // restart the animation
      card.classList.add("changed");
    }
  }

  // Why this card takes no reservations now, if the operator closed it: said on the card.
  renderClosed(card, now) {
    const endsAt = card.dataset.endsAt ? Number(card.dataset.endsAt) : null;
    const ended = endsAt !== null && endsAt <= now;
    const paused = card.dataset.paused === "true";
    const state = ended ? "ended" : paused ? "paused" : "";
    if (card.dataset.closed === state) return;
    card.dataset.closed = state;
    const note = $(".closed", card);
    note.hidden = !state;
    note.textContent = {
      ended: "This sale has ended.",
      paused: "Reservations are paused by the shop for now.",
      "": "",
    }[state];
  }

  // Only what can be asked for: 1 … max. A sold-out card keeps one, disabled.
  setQuantities(select, max) {
    const wanted = Math.max(1, max);
    if (select.options.length !== wanted) {
      const chosen = Math.min(Number(select.value) || 1, wanted);
      const options = [];
      for (let q = 1; q <= wanted; q += 1) options.push(new Option(String(q), String(q)));
      select.replaceChildren(...options);
      select.value = String(chosen);
    }
    select.closest(".product").dataset.max = String(max);
  }

  // On sale now, or coming soon (by start time): the card goes where it belongs, keeping
  // the keyboard focus if it had it.
  place(card, now) {
    const startsAt = card.dataset.startsAt ? Number(card.dataset.startsAt) : null;
    const upcoming = startsAt !== null && startsAt > now;
    const list = upcoming ? this.soon : this.onSale;
    card.classList.toggle("not-started", upcoming);
    $(".starts", card).hidden = !upcoming;
    if (card.parentElement === list) return;
    const focused = card.contains(document.activeElement) ? document.activeElement : null;
    const key = (c) => (upcoming ? [Number(c.dataset.startsAt), Number(c.dataset.id)] : [0, Number(c.dataset.id)]);
    const [a, b] = key(card);
    const after = [...list.children].find((other) => {
      const [x, y] = key(other);
      return x > a || (x === a && y > b);
    });
    list.insertBefore(card, after || null);
    focused?.focus();
    this.soonSection.hidden = !this.soon.children.length;
    this.showEmpty();
  }

  showEmpty() {
    $("#none-on-sale").hidden = !this.loaded || this.onSale.children.length > 0;
  }

  // -- holds ----------------------------------------------------------------------------

  renderHold({ reservation, name, tentative }) {
    let item = this.holdItem(reservation.id);
    if (!item) {
      item = this.holdTemplate.content.firstElementChild.cloneNode(true);
      item.dataset.id = reservation.id;
      const whatId = `hold-${reservation.id}-what`;
      $(".what", item).id = whatId;
      item.setAttribute("aria-labelledby", whatId);
      for (const button of item.querySelectorAll("button")) button.setAttribute("aria-describedby", whatId);
      this.holds.prepend(item);
    }
    this.holdsSection.hidden = false;
    item.dataset.status = reservation.status;
    item.dataset.expiresAt = reservation.expiresAt;
    $(".what", item).textContent = `${reservation.quantity} × ${name}`;
    const price = reservation.product?.price;
    $(".cost", item).textContent =
      price === undefined
        ? ""
        : `${this.money.text(price)} each · Total ${this.money.total(price, reservation.quantity)}`;
    const active = reservation.status === "ACTIVE" && !tentative;
    item.dataset.active = String(active);
    $(".left", item).hidden = !active;
    $(".outcome", item).textContent = active
      ? ""
      : tentative
        ? OUTCOMES.EXPIRED
        : outcomeOf(reservation);
    const reference = $(".reference", item);
    reference.hidden = !reservation.orderReference;
    reference.textContent = reservation.orderReference ? `Order reference: ${reservation.orderReference}` : "";
    $(".complete", item).hidden = !active;
    $(".cancel", item).hidden = !active;
    $(".dismiss", item).hidden = active;
    if (!active) $(".error", item).hidden = true;
  }

  focusHold(id) {
    const item = this.holdItem(id);
    if (!item) return;
    this.expandHolds(true);
    item.scrollIntoView({ block: "nearest" });
    item.focus({ preventScroll: true });
  }

  expandHolds(open) {
    this.holdsToggle.setAttribute("aria-expanded", String(open));
    this.holdsToggle.textContent = open ? "Hide" : "Show";
    this.holds.hidden = !open;
  }

  setHoldBusy(item, action) {
    if (!item) return;
    item.setAttribute("aria-busy", String(Boolean(action)));
    for (const name of ["complete", "cancel"]) {
      const button = $(`.${name}`, item);
      button.disabled = Boolean(action);
      button.textContent = action === name ? BUSY_LABELS[name] : IDLE_LABELS[name];
    }
  }

  // -- time -----------------------------------------------------------------------------

  tick({ now, paused, summary }) {
    for (const item of this.holds.children) {
      if (item.dataset.active !== "true") continue;
      const left = Date.parse(item.dataset.expiresAt) - now;
      $(".countdown", item).textContent = formatDuration(left);
      item.classList.toggle("ending", left < 30_000);
    }
    $("#holds-summary").textContent = summary;
    for (const card of [...this.onSale.children, ...this.soon.children]) {
      this.place(card, now);
      const upcoming = card.classList.contains("not-started");
      if (upcoming) $(".starts-in", card).textContent = `(${formatIn(Number(card.dataset.startsAt) - now)})`;
      this.renderClosed(card, now);
      const closed = Boolean(card.dataset.closed);
      const max = Number(card.dataset.max);
      $("select", card).disabled = upcoming || closed || max <= 0;
      if (!card.classList.contains("busy")) {
        $("button", card).disabled = upcoming || closed || paused || max <= 0;
      }
    }
  }

  // -- the connection -------------------------------------------------------------------

  renderConnection({ state, lastHeard }) {
    renderConnection(this.connection, state, lastHeard);
    this.stale = state === "offline";
    document.body.classList.toggle("stale", this.stale);
    for (const note of document.querySelectorAll(".product .stale-note")) note.hidden = !this.stale;
  }

  // -- busy and errors ------------------------------------------------------------------

  setProductBusy(card, busy) {
    if (!card) return;
    card.classList.toggle("busy", busy);
    const button = $("button", card);
    button.disabled = busy;
    button.textContent = busy ? "Reserving…" : "Reserve";
  }

  showError(element, message) {
    if (!element) return;
    const error = $(".error", element);
    error.textContent = message || "";
    error.hidden = !message;
  }
}
