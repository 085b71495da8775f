// Live updates: the /ws socket, and polling while it cannot be used.
//
// States: "connecting" (first attempt), "live" (socket open), "reconnecting" (socket lost,
// trying again), "polling" (no socket for now, but the shop answers: GET /api/products
// every 3 s with If-None-Match, the watched holds and the shopper's tickets too (each with
// its own If-None-Match), and the waiting rooms' counts (GET /api/queues, what the socket's
// `queue` frames carry), while the socket is retried with
// backoff and jitter), "offline" (neither the socket nor the last poll reached the shop:
// what the page shows is the last it heard, at `lastHeard`). The page stays correct in
// every state but "offline", where it says that its stock may be out of date.

import { ApiError, api, clock, parseTime } from "./api.js";

export const CONNECTION_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  polling: "Updating every few seconds",
  offline: "Can't reach the shop",
};

// A product's version this far below the one a page holds is not an old frame but the
// product taken back (the database restored from a backup, or a version far ahead undone):
// the server's rule too (server/service/catalog.py VERSION_RESET). Frames from different
// processes arrive out of order by a few versions, never by this many.
export const VERSION_RESET = 1000;

// Whether `version` of a product is older than `held`, the one the page holds, and to be
// dropped (`same`: an equal version too); one more than VERSION_RESET below is not.
export function older(version, held, same = false) {
  return (version < held || (same && version === held)) && held - version <= VERSION_RESET;
}

const POLL_MS = 3000;
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 15000;
const STABLE_MS = 10000;
// How long a join sent over the socket waits for its answer before the page POSTs instead.
const JOIN_WAIT_MS = 5000;
// The HTTP status an `error` frame's code stands for (sentences are chosen by status).
const JOIN_ERROR_STATUS = { product_not_found: 404, rate_limited: 429, unavailable: 503 };

export class LiveFeed {
  // handlers: products(list), stock(frame), product(product, reset), reservation(reservation),
  // state(name); and, for the waiting room, ticket(ticket), noTicket(productId) (polled: the
  // shopper has none) and queue(frame) (how many wait and are admitted, per product)
  constructor(handlers) {
    this.handlers = handlers;
    this.productIds = null; // the products this page shows, or null: every product
    this.state = null;
    this.socket = null;
    this.watching = [];
    this.tickets = new Map(); // product id → the ETag of the shopper's ticket last polled
    this.rooms = []; // the products with a waiting room whose counts are polled
    this.roomsEtags = []; // the ETag of each request of those counts (100 rooms each)
    this.joins = new Map(); // product id → how to settle the join sent over the socket
    this.retries = 0;
    this.pollTimer = null;
    this.retryTimer = null;
    this.etag = null;
    this.liveSince = null;
    this.polled = null; // the last poll's outcome: "polling" (answered) or "offline"
    this.lastHeard = null; // Date.now() when the page last knew its stock was current
  }

  // ids: the products the page shows (the socket's snapshot and frames, and the polled
  // list, are then those alone), or null for every product.
  start(ids = null) {
    this.productIds = ids && ids.length ? ids.join(",") : null;
    this.setState("connecting");
    this.connect();
  }

  // The holds this page follows; the server answers with their current state.
  watch(ids) {
    this.watching = [...ids];
    this.sendWatch();
  }

  // The products whose ticket this page follows: over the socket the server pushes them
  // (the socket's shopper decides); while polling, each is asked for with its ETag.
  followTickets(productIds) {
    const next = new Map();
    for (const id of productIds) next.set(id, this.tickets.get(id) ?? null);
    this.tickets = next;
  }

  // The products with a waiting room this page shows: while polling, their counts (how many
  // wait, how many hold a pass) are asked for, by id, 100 a request, each with its ETag.
  followQueues(productIds) {
    const next = [...productIds].sort((a, b) => a - b);
    if (next.join(",") !== this.rooms.join(",")) this.roomsEtags = [];
    this.rooms = next;
  }

  // Join a product's waiting room over the socket (`{"type": "join", "productId"}`), which
  // the server answers with the ticket frame or an `error` frame naming the product.
  // Resolves the ticket; rejects with an ApiError for an error frame; resolves null when
  // the socket is not live, closes first, has no shopper (`no_shopper`: the POST has the
  // cookie) or no answer comes within JOIN_WAIT_MS: the caller then POSTs the join
  // (joining again gives the same ticket, so a join that did arrive is not doubled).
  join(productId) {
    if (this.state !== "live" || this.socket?.readyState !== WebSocket.OPEN) {
      return Promise.resolve(null);
    }
    this.settleJoin(productId, { ticket: null }); // one at a time per product
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.settleJoin(productId, { ticket: null }), JOIN_WAIT_MS);
      this.joins.set(productId, { resolve, reject, timer });
      this.socket.send(JSON.stringify({ type: "join", productId }));
    });
  }

  settleJoin(productId, { ticket, error }) {
    const pending = this.joins.get(productId);
    if (!pending) return;
    this.joins.delete(productId);
    clearTimeout(pending.timer);
    if (error) pending.reject(error);
    else pending.resolve(ticket);
  }

  joinRefused(frame) {
    if (frame.code === "no_shopper") {
      this.settleJoin(frame.productId, { ticket: null });
      return;
    }
    const status = JOIN_ERROR_STATUS[frame.code] ?? 409;
    const error = new ApiError(status, { statusCode: status, code: frame.code, message: frame.message });
    this.settleJoin(frame.productId, { error });
  }

  sendWatch() {
    if (this.socket?.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ type: "watch", reservations: this.watching }));
    }
  }

  connect() {
    this.retryTimer = null;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    let socket;
    try {
      const only = this.productIds ? `?ids=${this.productIds}` : "";
      socket = new WebSocket(`${scheme}://${location.host}/ws${only}`);
    } catch {
      this.lost();
      return;
    }
    this.socket = socket;
    socket.addEventListener("open", () => this.sendWatch());
    socket.addEventListener("message", (event) => this.receive(event.data));
    socket.addEventListener("close", () => {
      if (this.socket === socket) this.lost();
    });
  }

  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.type) {
      case "snapshot": {
        // Live only now: a socket that opens and is closed at once (a full server, a
        // proxy) must not stop the polling, nor reset the backoff.
        const now = Date.now();
        clock.learn(parseTime(frame.serverTime), now, now, true);
        this.handlers.products(frame.products);
        this.liveSince = Date.now();
        this.lastHeard = this.liveSince;
        this.polled = null;
        this.stopPolling();
        this.setState("live");
        break;
      }
      case "stock":
        this.handlers.stock(frame);
        break;
      case "product":
        // `reset`: the product was taken back from the database (restored from a backup):
        // the page takes it whatever version it holds.
        this.handlers.product(frame.product, frame.reset === true);
        break;
      case "reservation":
        this.handlers.reservation(frame.reservation);
        break;
      case "ticket":
        this.handlers.ticket?.(frame.ticket);
        if (frame.ticket) this.settleJoin(frame.ticket.productId, { ticket: frame.ticket });
        break;
      case "queue":
        this.handlers.queue?.(frame);
        break;
      case "error":
        // A join refused names its product; any other error frame is nothing to do.
        if (frame.productId != null) this.joinRefused(frame);
        break;
      default:
        break; // a kind this page does not know: nothing to do
    }
  }

  lost() {
    if (this.state === "live") this.lastHeard = Date.now(); // current until this moment
    this.socket = null;
    for (const id of [...this.joins.keys()]) this.settleJoin(id, { ticket: null }); // → POST
    // Start the backoff over only after a socket that lasted: one that is accepted and
    // closed again and again must not be retried at full speed.
    if (this.liveSince && Date.now() - this.liveSince > STABLE_MS) this.retries = 0;
    this.liveSince = null;
    this.setState(this.polled || "reconnecting");
    this.startPolling();
    // Back off, with jitter, so that a restarted server is not hit by every page at once.
    const base = Math.min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** this.retries);
    this.retries += 1;
    this.retryTimer = setTimeout(() => this.connect(), base * (0.5 + Math.random()));
  }

  startPolling() {
    if (this.pollTimer) return;
    this.pollTimer = setTimeout(() => this.poll(), POLL_MS);
  }

  stopPolling() {
    clearTimeout(this.pollTimer);
    this.pollTimer = null;
  }

  async poll() {
    let wait = POLL_MS;
    try {
      const query = this.productIds ? `ids=${this.productIds}` : "";
      const { status, data, etag } = await api.products(this.etag, query);
      if (status === 200) {
        this.etag = etag;
        this.handlers.products(data);
      }
      this.answered();
    } catch (error) {
      // Not reachable (no answer, or a proxy's 502/504 for a shop that is down), or busy
      // (429, 503): try again next tick, or when the server says to.
      const asked = error instanceof ApiError ? Number(error.retryAfter) * 1000 : 0;
      if (asked > wait) wait = asked;
      if (!(error instanceof ApiError) || [502, 504].includes(error.status)) this.unreachable();
    }
    for (const id of this.state === "polling" ? this.watching : []) {
      try {
        const { data: reservation } = await api.reservation(id);
        this.handlers.reservation(reservation);
      } catch {
        // A hold that no longer exists, or a blink: the next poll asks again.
      }
    }
    // At most 100 ids a request: a request per hundred rooms (without ids the server lists
    // only the rooms someone is in, and a room that empties would keep its last counts here).
    for (let n = 0; this.state === "polling" && n * 100 < this.rooms.length; n += 1) {
      const query = `ids=${this.rooms.slice(n * 100, n * 100 + 100).join(",")}`;
      try {
        const { status, data, etag } = await api.queues(this.roomsEtags[n] ?? null, query);
        if (status === 200) {
          this.roomsEtags[n] = etag;
          for (const { productId, waiting, admitted } of data) {
            this.handlers.queue?.({ type: "queue", productId, waiting, admitted });
          }
        }
      } catch {
        // A blink: the next poll asks again.
      }
    }
    for (const id of this.state === "polling" ? [...this.tickets.keys()] : []) {
      try {
        const { status, data, etag } = await api.ticket(id, this.tickets.get(id));
        if (status === 200 && this.tickets.has(id)) {
          this.tickets.set(id, etag);
          this.handlers.ticket?.(data);
        }
      } catch (error) {
        if (error instanceof ApiError && error.status === 404 && this.tickets.has(id)) {
          this.tickets.set(id, null);
          this.handlers.noTicket?.(id);
        }
      }
    }
    if (this.pollTimer) this.pollTimer = setTimeout(() => this.poll(), wait);
  }

  answered() {
    this.lastHeard = Date.now();
    this.polled = "polling";
    if (this.state !== "live") this.setState("polling");
  }

  unreachable() {
    this.polled = "offline";
    if (this.state !== "live") this.setState("offline");
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.handlers.state(state);
  }
}
