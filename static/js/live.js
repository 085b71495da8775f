// Live updates: the /ws socket, and polling while it cannot be used.
//
// States: "connecting" (first attempt), "live" (socket open), "reconnecting" (socket lost,
// trying again), "polling" (no socket for now: GET /api/products every 3 s with
// If-None-Match, the watched holds too, while the socket is retried with backoff and
// jitter). The page stays correct in every state.

import { ApiError, api, clock, parseTime } from "./api.js";

const POLL_MS = 3000;
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 15000;
const STABLE_MS = 10000;

export class LiveFeed {
  // handlers: products(list), stock(frame), product(product), reservation(reservation),
  // state(name)
  constructor(handlers) {
    this.handlers = handlers;
    this.state = null;
    this.socket = null;
    this.watching = [];
    this.retries = 0;
    this.pollTimer = null;
    this.retryTimer = null;
    this.etag = null;
    this.liveSince = null;
  }

  start() {
    this.setState("connecting");
    this.connect();
  }

  // The holds this page follows; the server answers with their current state.
  watch(ids) {
    this.watching = [...ids];
    this.sendWatch();
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
      socket = new WebSocket(`${scheme}://${location.host}/ws`);
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
        this.stopPolling();
        this.setState("live");
        break;
      }
      case "stock":
        this.handlers.stock(frame);
        break;
      case "product":
        this.handlers.product(frame.product);
        break;
      case "reservation":
        this.handlers.reservation(frame.reservation);
        break;
      default:
        break; // an error frame or a kind this page does not know: nothing to do
    }
  }

  lost() {
    this.socket = null;
    // Start the backoff over only after a socket that lasted: one that is accepted and
    // closed again and again must not be retried at full speed.
    if (this.liveSince && Date.now() - this.liveSince > STABLE_MS) this.retries = 0;
    this.liveSince = null;
    this.setState(this.pollTimer ? "polling" : "reconnecting");
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
    this.setState("polling");
    let wait = POLL_MS;
    try {
      const { status, data, etag } = await api.products(this.etag);
      if (status === 200) {
        this.etag = etag;
        this.handlers.products(data);
      }
      for (const id of this.watching) {
        const { data: reservation } = await api.reservation(id);
        this.handlers.reservation(reservation);
      }
    } catch (error) {
      // Not reachable right now, or a hold that no longer exists: try again next tick, or
      // when a busy server (429, 503) says to.
      const asked = error instanceof ApiError ? Number(error.retryAfter) * 1000 : 0;
      if (asked > wait) wait = asked;
    }
    if (this.pollTimer) this.pollTimer = setTimeout(() => this.poll(), wait);
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.handlers.state(state);
  }
}
