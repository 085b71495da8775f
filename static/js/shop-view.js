// The shop page's DOM. Two doors: bind(event, handler) and render(command, data).
// Every value from the server reaches the page through textContent or an attribute, never
// as HTML.

import { renderConnection } from "./connection.js";
import { Money, formatCount, formatDuration, formatIn, formatMoment, formatWait } from "./format.js";

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

// Why a waiting ticket has no wait estimate, as the server says (`waitUnknownBecause`), in
// the page's words: the page does not work it out itself.
const WAIT_UNKNOWN = {
  not_started: "Turns start when the sale starts.",
  held: "Estimated wait: not known while every unit is held.",
  passes_cover:
    "Estimated wait: not known: those ahead with a turn now cover every unit left; you move up as their turns lapse or units come back.",
  no_admissions: "Estimated wait: not known yet (the line has not moved).",
};

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
      // The waiting room's buttons: join (again) and leave.
      list.addEventListener("click", (event) => {
        const button = event.target.closest(".lobby button");
        if (!button) return;
        const id = Number(button.closest(".product").dataset.id);
        if (button.classList.contains("join")) this.handlers.join?.(id);
        if (button.classList.contains("leave")) this.handlers.leave?.(id);
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
      case "lobbyBusy":
        this.setLobbyBusy(this.productCard(data.id), data.action);
        break;
      case "focusLobby":
        this.focusLobby(this.productCard(data));
        break;
      case "focusReserve": {
        const card = this.productCard(data);
        if (!card) break;
        card.dataset.wantsFocus = "true";
        this.focusReserve(card);
        break;
      }
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
  // `ticket`: the shopper's ticket for it, if the product has a queue and they have one;
  // `queue`: the latest `{waiting, admitted}` for it; `opensAt`: when its line opens (ms), if
  // known.
  renderProduct({ product, changed = false, max, mine, has = 0, now, ticket = null, queue = null, opensAt = null }) {
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
    this.renderLobby(card, { product, ticket, queue, opensAt, now });
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

  // -- the waiting room ------------------------------------------------------------------

  // The lobby of a product with a queue: join, where the shopper stands and how long until
  // their turn, their turn with its countdown, or how it ended. Reserving is offered only
  // with a pass (their turn), except on a product without a start time whose line is empty
  // while units are left (the line is then a waitlist for when none is).
  renderLobby(card, { product, ticket, queue, opensAt, now }) {
    const lobby = $(".lobby", card);
    const queued = Boolean(product.queue) && product.queue !== "off";
    const state = ticket && ticket.state !== "left" ? ticket.state : "none";
    const left = product.availableStock;
    const held = product.heldStock ?? 0;
    const waiting = queue?.waiting ?? ticket?.waiting ?? null;
    const gone = left <= 0 && held <= 0; // nothing left and nothing may come back
    // A product without a start whose line is empty while units are left: no line to join.
    const waitlistOpen = !product.saleStartsAt && left > 0 && !waiting;
    card.classList.toggle("queued", queued);
    lobby.hidden = !queued || (state === "none" && (waitlistOpen || gone));
    if (!queued) {
      card.dataset.lobby = "";
      $(".reserve", card).hidden = false;
      return;
    }
    card.dataset.lobby = state;
    card.dataset.opensAt = opensAt ?? "";
    card.dataset.passExpiresAt = state === "admitted" && ticket.passExpiresAt ? Date.parse(ticket.passExpiresAt) : "";
    // Reserve: with a pass, or on an open waitlist without a ticket.
    $(".reserve", card).hidden = !(state === "admitted" || (state === "none" && waitlistOpen));

    const name = product.name;
    let headline = "";
    let place = "";
    let wait = "";
    // Units only held may come back: said while the shopper waits and none is left.
    const mayReturn = held; // the product's, kept current by the stock frames
    let note = "";
    let canJoin = false;
    switch (state) {
      case "waiting":
        headline = "You're in line.";
        if (ticket.position != null) {
          place = `Number ${formatCount(ticket.position)} in line · ${formatCount(ticket.ahead ?? ticket.position - 1)} ahead of you`;
        } else if (ticket.drawAt) {
          place = `Your place is drawn at random when the sale starts (${formatMoment(Date.parse(ticket.drawAt))}); everyone who joins before then has the same chance.`;
        } else {
          place = "Your place in line is being drawn.";
        }
        if (left <= 0 && mayReturn > 0) {
          note = `${formatCount(mayReturn)} ${mayReturn === 1 ? "unit is" : "units are"} held and may come back.`;
        }
        if (ticket.estimatedWaitSeconds != null) wait = `Estimated wait: ${formatWait(ticket.estimatedWaitSeconds * 1000)}`;
        else wait = WAIT_UNKNOWN[ticket.waitUnknownBecause] ?? "Estimated wait: not known.";
        break;
      case "admitted":
        headline = "Your turn: reserve within";
        break;
      case "reserved":
        headline = "You had your turn and reserved (see Your holds).";
        break;
      case "sold_out":
        headline = "Sold out: every unit has gone. Thank you for waiting.";
        break;
      case "lapsed":
        headline = "Your turn passed; join again.";
        canJoin = !gone;
        break;
      default: {
        // No ticket: join, if the line is open.
        const opens = opensAt !== null && opensAt > now;
        if (gone || waitlistOpen) {
          headline = "";
        } else if (opens) {
          headline = `The line opens ${formatMoment(opensAt)}.`;
          card.dataset.opensIn = "true";
        } else {
          headline = product.saleStartsAt && Date.parse(product.saleStartsAt) > now
            ? "Join the line now: turns start when the sale starts."
            : "Join the line to reserve: turns go in order as units are free.";
          if (product.queue === "random" && product.saleStartsAt && Date.parse(product.saleStartsAt) > now) {
            headline = "Join the line now: at the start everyone in it is put in a random order.";
          }
        }
        canJoin = !gone && !waitlistOpen;
        if (left <= 0 && held > 0) {
          note = `${formatCount(held)} ${held === 1 ? "unit is" : "units are"} held and may come back.`;
        }
      }
    }
    $(".lobby-headline", lobby).textContent = headline;
    $(".lobby-state", lobby).hidden = !headline;
    $(".pass-left", lobby).hidden = state !== "admitted";
    for (const [selector, text] of [[".lobby-place", place], [".lobby-wait", wait], [".lobby-note", note]]) {
      $(selector, lobby).textContent = text;
      $(selector, lobby).hidden = !text;
    }
    const count = $(".lobby-count", lobby);
    const showCount = waiting !== null && ["none", "waiting", "lapsed"].includes(state) && !gone;
    count.hidden = !showCount;
    count.textContent = showCount ? `${formatCount(waiting)} ${waiting === 1 ? "person" : "people"} waiting` : "";
    const join = $(".join", lobby);
    join.hidden = !canJoin;
    join.textContent = state === "lapsed" ? "Join again" : "Join the line";
    join.setAttribute("aria-describedby", $(".name", card).id);
    const leave = $(".leave", lobby);
    leave.hidden = !["waiting", "admitted"].includes(state);
    leave.setAttribute("aria-describedby", $(".name", card).id);
    if (!card.dataset.lobbyBusy) join.disabled = Boolean(opensAt !== null && opensAt > now && state === "none");
    lobby.dataset.name = name;
  }

  // The countdown of a pass, and whether the line has opened yet.
  tickLobby(card, now) {
    const expires = card.dataset.passExpiresAt ? Number(card.dataset.passExpiresAt) : null;
    if (expires !== null) {
      const left = expires - now;
      $(".pass-countdown", card).textContent = formatDuration(left);
      card.classList.toggle("pass-ending", left < 15_000);
    } else {
      card.classList.remove("pass-ending");
    }
    const opensAt = card.dataset.opensAt ? Number(card.dataset.opensAt) : null;
    if (card.dataset.lobby === "none" && opensAt !== null && !card.dataset.lobbyBusy) {
      const join = $(".lobby .join", card);
      join.disabled = opensAt > now;
      if (opensAt > now) {
        $(".lobby-headline", card).textContent = `The line opens ${formatMoment(opensAt)} (${formatIn(opensAt - now)}).`;
      } else if (card.dataset.opensIn) {
        delete card.dataset.opensIn;
        $(".lobby-headline", card).textContent = "Join the line now: turns start when the sale starts.";
      }
    }
  }

  // The shopper's turn: their Reserve button, if the focus was in the waiting room (whose
  // buttons are gone now) or nowhere; never taken from what they are doing. A button still
  // off (the units' return not heard yet) takes it as soon as it is on.
  focusReserve(card) {
    if (!card.dataset.wantsFocus) return;
    const button = $(".reserve button", card);
    if (card.dataset.lobby !== "admitted") {
      delete card.dataset.wantsFocus;
      return;
    }
    if (button.disabled) return;
    delete card.dataset.wantsFocus;
    const active = document.activeElement;
    if (!active || active === document.body || $(".lobby", card).contains(active)) button.focus();
  }

  setLobbyBusy(card, action) {
    if (!card) return;
    const lobby = $(".lobby", card);
    lobby.setAttribute("aria-busy", String(Boolean(action)));
    if (action) card.dataset.lobbyBusy = action;
    else delete card.dataset.lobbyBusy;
    const join = $(".join", lobby);
    const leave = $(".leave", lobby);
    join.disabled = Boolean(action);
    leave.disabled = Boolean(action);
    if (action === "join") join.textContent = "Joining…";
    if (action === "leave") leave.textContent = "Leaving…";
    if (!action) leave.textContent = "Leave the line";
  }

  focusLobby(card) {
    if (!card) return;
    const state = $(".lobby-state", card);
    if (!state.hidden) state.focus();
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
        $(".reserve button", card).disabled = upcoming || closed || paused || max <= 0;
      }
      if (card.classList.contains("queued")) {
        this.tickLobby(card, now);
        this.focusReserve(card);
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
    const button = $(".reserve button", card);
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
