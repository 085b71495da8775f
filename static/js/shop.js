// The shop page: products with live stock, reserving, and the shopper's holds.

import { ApiError, api, clock, parseTime, sentenceFor } from "./api.js";
import { formatDuration } from "./format.js";
import { LiveFeed, older } from "./live.js";
import { ShopView } from "./shop-view.js";

const HOLDS_KEY = "flashsale.holds"; // ids of this browser's holds, kept across reloads
const TICK_MS = 250;
const TITLE = document.title;
// Reminders of the time left on a hold, in ms: each announced once, and only if it is
// still ahead when the page first sees the hold (a 45-second hold never hears "60 seconds").
const REMINDERS = [60_000, 30_000, 10_000];
// Products on one page. A shop can have thousands (all of them are 1.35 MB at 10,000): a
// page shows those its address names (`/?ids=3,8,9`, a sale's page), or a page of them,
// the newest first (`/?before=58` for older ones), and follows only those.
const PAGE_SIZE = 100;

function productsQuery() {
  const params = new URLSearchParams(location.search);
  const ids = params.get("ids");
  if (ids) return { query: `ids=${encodeURIComponent(ids)}`, named: true };
  const before = params.get("before");
  const page = `limit=${PAGE_SIZE}${before ? `&before=${encodeURIComponent(before)}` : ""}`;
  return { query: page, named: false, paged: Boolean(before) };
}

function nextPage(headers) {
  const link = headers?.get("Link");
  const match = link && /<[^>]*[?&]before=(\d+)[^>]*>;\s*rel="next"/.exec(link);
  return match ? `?before=${match[1]}` : null;
}

function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

class Shop {
  constructor(view) {
    this.view = view;
    this.config = { maxQuantity: 10, currency: "EUR" };
    this.products = new Map(); // id → Product, the newest version seen
    this.holds = new Map(); // id → Reservation
    this.tentative = new Set(); // holds whose time is up, before the server has said so
    this.unresolved = new Set(); // stored ids we could not look up this time
    this.reminded = new Map(); // hold id → the lowest reminder said (or passed unsaid)
    this.settledSaid = new Set(); // holds whose ending has been announced
    this.pausedUntil = 0; // Date.now() until which the server asked us not to reserve
    // Per product id, this shopper's units in active and completed holds, as the server
    // counts them against a product's limit per customer (GET /api/me).
    this.owned = new Map();
    // The products whose waiting room this shopper has a ticket in, as GET /api/me last
    // said (null: not known).
    this.ticketed = null;
    this.shown = null; // Set of the product ids this page shows, or null: every product
    // The waiting room (issue 17), per product id with a queue: this shopper's ticket, and
    // how many wait and are admitted (the socket's `queue` frames, or GET /api/queues while
    // polling).
    this.tickets = new Map();
    this.queues = new Map();
    this.passSaid = new Map(); // product id → the pass expiry whose end was announced
    this.live = new LiveFeed({
      products: (list) => {
        const mine = list.filter((p) => this.shows(p.id));
        mine.forEach((p) => this.applyProduct(p));
        this.view.render("products", mine);
      },
      stock: (frame) => this.shows(frame.productId) && this.applyStock(frame),
      product: (product, reset) => this.shows(product.id) && this.applyProduct(product, reset),
      reservation: (reservation) => this.applyReservation(reservation),
      state: (state) => this.view.render("connection", { state, lastHeard: this.live.lastHeard }),
      ticket: (ticket) => this.applyTicket(ticket),
      noTicket: (productId) => this.applyTicket({ productId, state: "left" }),
      queue: ({ productId, waiting, admitted }) => {
        this.queues.set(productId, { waiting, admitted });
        this.renderProductOf(productId);
      },
    });
    view.bind("reserve", (productId, quantity) => this.reserve(productId, quantity));
    view.bind("complete", (id) => this.act(id, "complete", api.complete));
    view.bind("cancel", (id) => this.act(id, "cancel", api.cancel));
    view.bind("dismiss", (id) => this.dismiss(id));
    view.bind("join", (productId) => this.join(productId));
    view.bind("leave", (productId) => this.leave(productId));
  }

  async start() {
    await this.refreshOwned();
    try {
      const { data: config } = await api.config();
      this.config = config;
      this.view.render("config", config);
      const { query, named, paged } = productsQuery();
      const { data: products, headers } = await api.products(null, query);
      products.forEach((p) => this.applyProduct(p));
      this.view.render("products", products);
      const next = nextPage(headers);
      this.view.render("morePages", next);
      // A shop whose products all fit on one page follows every product, so that new
      // ones appear; otherwise the page follows what it shows.
      if (named || paged || next) this.shown = new Set(products.map((p) => p.id));
    } catch (error) {
      this.view.render("notice", sentenceFor(error));
    }
    await this.restoreHolds();
    await this.restoreTickets();
    this.live.start(this.shown ? [...this.shown] : null);
    this.live.watch(this.activeHoldIds());
    setInterval(() => this.tick(), TICK_MS);
    this.tick();
  }

  // -- what the server says --------------------------------------------------------------

  shows(productId) {
    return this.shown === null || this.shown.has(productId);
  }

  // reset: the server took the product back from its database (a `product` frame marked
  // `reset`): taken whatever version the page holds.
  applyProduct(product, reset = false) {
    const known = this.products.get(product.id);
    if (known && !reset && older(product.version, known.version)) return;
    const changed = Boolean(known) && known.availableStock !== product.availableStock;
    this.products.set(product.id, product);
    this.renderProduct(product, changed);
    if (this.queued(product) !== this.queued(known)) {
      this.live.followTickets(this.ticketIds());
      this.live.followQueues(this.queuedIds());
    }
  }

  applyStock({ productId, availableStock, heldStock, version }) {
    const known = this.products.get(productId);
    if (!known || older(version, known.version, true)) return;
    const update = { availableStock, version };
    if (heldStock !== undefined) update.heldStock = heldStock;
    this.applyProduct({ ...known, ...update });
  }

  applyReservation(reservation) {
    if (reservation.product) this.applyProduct(reservation.product);
    const known = this.holds.get(reservation.id);
    if (!known) return;
    const settled = reservation.status !== "ACTIVE";
    if (settled) this.tentative.delete(reservation.id);
    this.holds.set(reservation.id, reservation);
    this.renderHold(reservation);
    this.renderProductOf(reservation.productId);
    if (settled && known.status === "ACTIVE") {
      this.announceEnd(reservation);
      this.live.watch(this.activeHoldIds());
      this.refreshOwned(); // a cancelled or expired hold gave its units back
    }
  }

  renderProduct(product, changed = false) {
    this.view.render("product", {
      product,
      changed,
      max: this.quantityLimit(product),
      mine: this.unitsHeld(product.id),
      has: this.owned.get(product.id) ?? 0,
      now: clock.now(),
      ticket: this.tickets.get(product.id) ?? null,
      queue: this.queues.get(product.id) ?? null,
      opensAt: this.opensAt(product),
    });
  }

  // -- the waiting room ---------------------------------------------------------------------

  queued(product) {
    return Boolean(product?.queue) && product.queue !== "off";
  }

  queuedIds() {
    return [...this.products.values()].filter((p) => this.queued(p) && this.shows(p.id)).map((p) => p.id);
  }

  // When the product's line opens (ms on the server's clock), if the page can know: its start
  // less the room's lead (`queueOpensSeconds` in /api/config), or what a refusal said.
  opensAt(product) {
    if (!this.queued(product) || !product.saleStartsAt) return null;
    const told = this.opens?.get(product.id);
    if (told !== undefined) return told;
    const lead = this.config.queueOpensSeconds;
    return Number.isFinite(lead) ? Date.parse(product.saleStartsAt) - lead * 1000 : null;
  }

  // The queued products the page shows whose ticket the shopper may hold: those GET /api/me
  // named or the page has seen a ticket of (asked for a product without one, the server
  // answers 404, an error in the browser's console for each, and while polling at every
  // poll), or, if it could not say, every one.
  ticketIds() {
    return this.queuedIds().filter((id) => !this.ticketed || this.ticketed.has(id) || this.tickets.has(id));
  }

  // The shopper's tickets for the queued products the page shows (a reload keeps one's place):
  // those of `ticketIds`; they are the tickets polled while the socket cannot be used.
  async restoreTickets() {
    const ids = this.ticketIds();
    await Promise.all(
      ids.map(async (id) => {
        try {
          const { data } = await api.ticket(id);
          this.applyTicket(data, { quiet: true });
        } catch {
          // None (404), or not reachable: the socket or the next poll will tell.
        }
      }),
    );
    this.live.followTickets(this.ticketIds());
  }

  // A ticket as the server gives it (over the socket, a poll, or an answer); what changed
  // for the shopper is said once.
  applyTicket(ticket, { quiet = false } = {}) {
    if (!ticket || ticket.productId == null) return;
    const id = ticket.productId;
    const known = this.tickets.get(id);
    this.tickets.set(id, ticket);
    if (!known) this.live.followTickets(this.ticketIds()); // polled from now on
    if (ticket.waiting != null) {
      const counts = this.queues.get(id) || {};
      this.queues.set(id, { ...counts, waiting: ticket.waiting });
    }
    this.renderProductOf(id);
    if (quiet || known?.state === ticket.state) return;
    const name = this.products.get(id)?.name || "this product";
    const sentences = {
      waiting:
        ticket.position != null
          ? `You're in line for ${name}: number ${ticket.position}, ${ticket.ahead ?? ticket.position - 1} ahead of you.`
          : `You're in line for ${name}. Your place is drawn at random when the sale starts.`,
      admitted: `Your turn for ${name}: reserve within ${formatDuration(parseTime(ticket.passExpiresAt) - clock.now())}.`,
      // A room switched off mid-sale ends its tickets `sold_out` too; the product, off, is
      // then on sale to anyone.
      sold_out: this.products.get(id)?.queue === "off"
        ? `The waiting room for ${name} has closed: reserve it directly.`
        : `${name} sold out while you waited.`,
      lapsed: `Your turn for ${name} passed; join again to wait for another.`,
      left: known && known.state !== "left" ? `You left the line for ${name}.` : "",
    };
    const sentence = sentences[ticket.state];
    if (sentence) this.view.render("announce", sentence);
    if (ticket.state === "admitted") this.view.render("focusReserve", id);
  }

  async join(productId) {
    this.view.render("productError", { id: productId, message: null });
    this.view.render("lobbyBusy", { id: productId, action: "join" });
    let joined = false;
    try {
      // Over the page's socket when it is live (no request of its own), else a POST.
      const data = (await this.live.join(productId)) ?? (await api.joinQueue(productId)).data;
      this.view.render("lobbyBusy", { id: productId, action: null });
      this.applyTicket(data);
      joined = true;
    } catch (error) {
      this.view.render("lobbyBusy", { id: productId, action: null });
      if (error instanceof ApiError && error.code === "queue_not_open" && error.body.opensAt) {
        this.opens = this.opens || new Map();
        this.opens.set(productId, parseTime(error.body.opensAt));
      }
      this.view.render("productError", { id: productId, message: sentenceFor(error) });
      this.renderProductOf(productId);
    }
    if (joined) this.view.render("focusLobby", productId);
  }

  async leave(productId) {
    this.view.render("productError", { id: productId, message: null });
    this.view.render("lobbyBusy", { id: productId, action: "leave" });
    try {
      await api.leaveQueue(productId);
      this.view.render("lobbyBusy", { id: productId, action: null });
      this.applyTicket({ productId, state: "left" });
      this.view.render("focusLobby", productId);
    } catch (error) {
      this.view.render("lobbyBusy", { id: productId, action: null });
      this.view.render("productError", { id: productId, message: sentenceFor(error) });
    }
  }

  // A pass whose time is up on the page's clock: the server decides; ask it once.
  checkPasses(now) {
    for (const [id, ticket] of this.tickets) {
      if (ticket.state !== "admitted" || !ticket.passExpiresAt) continue;
      const expires = parseTime(ticket.passExpiresAt);
      if (expires > now || this.passSaid.get(id) === expires) continue;
      this.passSaid.set(id, expires);
      api.ticket(id).then(
        ({ data }) => this.applyTicket(data),
        () => {},
      );
    }
  }

  renderProductOf(productId) {
    const product = this.products.get(productId);
    if (product) this.renderProduct(product);
  }

  // The most units the shopper may ask for now: what is left, up to MAX_QUANTITY, and up
  // to what the product's limit per customer leaves them.
  quantityLimit(product) {
    let most = Math.min(this.config.maxQuantity, product.availableStock);
    if (product.maxPerShopper) most = Math.min(most, product.maxPerShopper - (this.owned.get(product.id) ?? 0));
    // A turn in a waiting room is for the limit per customer's worth, or for one unit.
    if (this.tickets.get(product.id)?.state === "admitted") most = Math.min(most, product.maxPerShopper || 1);
    return Math.max(0, most);
  }

  // What the server counts against the limits: asked again after every change of a hold.
  async refreshOwned() {
    try {
      const { data } = await api.me();
      this.owned = new Map(Object.entries(data.units || {}).map(([id, n]) => [Number(id), n]));
      if (Array.isArray(data.tickets)) {
        this.ticketed = new Set(data.tickets);
        this.live.followTickets(this.ticketIds()); // one made on another page: polled too
      }
    } catch {
      return; // the figures stay as they were; the server still enforces the limit
    }
    for (const product of this.products.values()) this.renderProduct(product);
  }

  unitsHeld(productId) {
    let units = 0;
    for (const r of this.holds.values()) {
      if (r.productId === productId && r.status === "ACTIVE" && !this.tentative.has(r.id)) units += r.quantity;
    }
    return units;
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
      this.renderProductOf(reservation.productId);
      this.live.watch(this.activeHoldIds());
      const left = parseTime(reservation.expiresAt) - clock.now();
      this.passReminders(reservation.id, left);
      this.view.render("focusHold", reservation.id);
      this.view.render(
        "announce",
        `Held ${reservation.quantity} of ${reservation.product.name} for ${formatDuration(left)}.`,
      );
      this.refreshOwned();
    } catch (error) {
      this.view.render("productError", { id: productId, message: sentenceFor(error) });
      // Refused by the limit per customer: the page learns what the server counts.
      if (error instanceof ApiError && error.code === "shopper_limit_reached") this.refreshOwned();
      // Not this shopper's turn (a queue, and no pass): the page asks where they stand.
      if (error instanceof ApiError && error.code === "not_admitted") {
        // Someone is in line, then (a page that has not heard how many yet offered Reserve).
        const counts = this.queues.get(productId) || {};
        this.queues.set(productId, { ...counts, waiting: Math.max(1, counts.waiting ?? 0) });
        api.ticket(productId).then(
          ({ data }) => this.applyTicket(data),
          () => this.applyTicket({ productId, state: "left" }, { quiet: true }),
        );
      }
      // A refusal says what the stock is now: show it at once, not at the next update.
      if (error instanceof ApiError && error.body.stock) this.applyStock(error.body.stock);
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

  async act(id, name, action) {
    this.view.render("holdError", { id, message: null });
    this.view.render("holdBusy", { id, action: name });
    try {
      const { data } = await action(id);
      this.applyReservation(data);
    } catch (error) {
      this.view.render("holdError", { id, message: sentenceFor(error) });
      if (error instanceof ApiError && error.status === 409) await this.refreshHold(id);
    } finally {
      this.view.render("holdBusy", { id, action: null });
    }
  }

  dismiss(id) {
    const reservation = this.holds.get(id);
    this.holds.delete(id);
    this.tentative.delete(id);
    this.saveHolds();
    this.view.render("removeHold", id);
    if (reservation) this.renderProductOf(reservation.productId);
  }

  // -- holds across reloads ---------------------------------------------------------------

  async restoreHolds() {
    let ids = [];
    try {
      ids = JSON.parse(localStorage.getItem(HOLDS_KEY) || "[]");
    } catch {
      ids = [];
    }
    // The shopper's running holds, as the server knows them (another tab's, or this
    // browser's after its storage was cleared), then those this browser remembers.
    try {
      const { data: running } = await api.myActiveHolds();
      for (const hold of running) {
        this.holds.set(hold.id, hold);
        this.passReminders(hold.id, parseTime(hold.expiresAt) - clock.now());
        this.applyProduct(hold.product);
        this.renderHold(hold);
      }
    } catch {
      // Only what this browser remembers, then.
    }
    for (const id of ids) {
      if (this.holds.has(id)) continue;
      try {
        const { data } = await api.reservation(id);
        this.holds.set(id, data);
        if (data.status !== "ACTIVE") this.settledSaid.add(id); // it ended before this visit
        this.passReminders(id, parseTime(data.expiresAt) - clock.now());
        this.applyProduct(data.product);
        this.renderHold(data);
      } catch (error) {
        // Gone (404): forget it. Not reachable now: keep the id for the next visit.
        if (!(error instanceof ApiError && error.status === 404)) this.unresolved.add(id);
      }
    }
    this.saveHolds();
    for (const reservation of this.holds.values()) this.renderProductOf(reservation.productId);
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
    let soonest = null;
    let active = 0;
    for (const reservation of this.holds.values()) {
      if (reservation.status !== "ACTIVE" || this.tentative.has(reservation.id)) continue;
      const left = parseTime(reservation.expiresAt) - now;
      if (left <= 0) {
        // Its time is up: say so now, and let the server confirm.
        this.tentative.add(reservation.id);
        this.renderHold(reservation);
        this.renderProductOf(reservation.productId);
        this.announceEnd({ ...reservation, status: "EXPIRED" });
        this.refreshHold(reservation.id);
      } else {
        active += 1;
        soonest = soonest === null ? left : Math.min(soonest, left);
        this.remind(reservation, left);
      }
    }
    this.checkPasses(now);
    let summary = "";
    if (active === 1) summary = `1 hold · ${formatDuration(soonest)} left`;
    else if (active > 1) summary = `${active} holds · next ends in ${formatDuration(soonest)}`;
    let title = soonest === null ? TITLE : `${formatDuration(soonest)} left to buy · ${TITLE}`;
    if (soonest === null) {
      // The shopper's turn, in the tab's title too: they may be looking at another tab.
      const passes = [...this.tickets.values()]
        .filter((t) => t.state === "admitted" && t.passExpiresAt)
        .map((t) => parseTime(t.passExpiresAt) - now)
        .filter((left) => left > 0);
      if (passes.length) title = `Your turn: ${formatDuration(Math.min(...passes))} to reserve · ${TITLE}`;
    }
    if (document.title !== title) document.title = title;
    this.view.render("tick", { now, paused: Date.now() < this.pausedUntil, summary });
  }

  // Reminders already behind `left` count as said: only those still ahead will be.
  passReminders(id, left) {
    const passed = REMINDERS.filter((mark) => left <= mark);
    if (passed.length && !this.reminded.has(id)) this.reminded.set(id, Math.min(...passed));
  }

  remind(reservation, left) {
    const said = this.reminded.get(reservation.id) ?? Infinity;
    // The lowest mark crossed: a page that slept past two marks says only the latest.
    const due = REMINDERS.filter((mark) => left <= mark && mark < said);
    if (!due.length) return;
    const mark = Math.min(...due);
    this.reminded.set(reservation.id, mark);
    this.view.render(
      "announce",
      `${Math.round(mark / 1000)} seconds left to buy ${this.nameOf(reservation)}.`,
    );
  }

  // How a hold ended, said once: the page's own "time is up" and the server's word that
  // follows it are one event to the shopper.
  announceEnd(reservation) {
    if (this.settledSaid.has(reservation.id)) return;
    this.settledSaid.add(reservation.id);
    const name = this.nameOf(reservation);
    const sentences = {
      COMPLETED: reservation.orderReference
        ? `You bought ${reservation.quantity} of ${name}. Order reference: ${reservation.orderReference}.`
        : `You bought ${reservation.quantity} of ${name}.`,
      CANCELLED:
        reservation.cancelledBy === "operator"
          ? `The shop cancelled your hold of ${name}${reservation.cancelReason ? `: ${reservation.cancelReason}` : ""}.`
          : `Your hold of ${name} was cancelled.`,
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
