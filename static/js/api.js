// Talking to the shop's API: JSON requests, errors as sentences, the server's clock.

export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super(body?.message || `The server answered ${status}.`);
    this.status = status;
    this.body = body || {};
    this.code = body?.code || "error";
    this.retryAfter = retryAfter;
  }
}

// The server's clock, as this page best knows it: a countdown must not trust the device's
// own clock, which may be minutes off.
export const clock = {
  offset: 0, // server time minus local time, in ms
  precise: false, // learned from a millisecond timestamp, not just a Date header

  now() {
    return Date.now() + this.offset;
  },

  // `serverMs` was read by the server somewhere between `sentAt` and `receivedAt`.
  learn(serverMs, sentAt, receivedAt, precise) {
    if (!Number.isFinite(serverMs) || (this.precise && !precise)) return;
    this.offset = serverMs - (sentAt + receivedAt) / 2;
    this.precise = this.precise || precise;
  },
};

export function parseTime(iso) {
  return iso == null ? null : Date.parse(iso);
}

// One human sentence for whatever went wrong, never a bare status code.
export function sentenceFor(error) {
  if (!(error instanceof ApiError)) {
    return "We could not reach the shop. Check your connection and try again.";
  }
  switch (error.status) {
    case 429:
      return `Too many requests from you just now; please wait ${error.retryAfter || "a few"} seconds and try again.`;
    case 503:
      return "The shop is very busy right now; please try again in a moment.";
    default:
      return error.status >= 500
        ? "Something went wrong on our side; please try again."
        : error.message;
  }
}

export async function request(method, path, { body, headers = {}, etag } = {}) {
  const sentAt = Date.now();
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  if (etag) init.headers["If-None-Match"] = etag;
  const response = await fetch(path, init);
  const receivedAt = Date.now();
  const date = response.headers.get("Date");
  if (date) clock.learn(Date.parse(date) + 500, sentAt, receivedAt, false);
  if (response.status === 304) return { status: 304, data: null, etag };
  let data = null;
  if (response.headers.get("Content-Type")?.includes("application/json")) {
    data = await response.json();
  }
  if (data?.serverTime) clock.learn(parseTime(data.serverTime), sentAt, receivedAt, true);
  if (!response.ok) {
    throw new ApiError(response.status, data, response.headers.get("Retry-After"));
  }
  return { status: response.status, data, etag: response.headers.get("ETag"), headers: response.headers };
}

export const api = {
  config: () => request("GET", "/api/config"),
  // query: "" (every product), "ids=3,8,9", or "limit=100&after=58" (a page, by id)
  products: (etag, query = "") =>
    request("GET", query ? `/api/products?${query}` : "/api/products", { etag }),
  reservation: (id) => request("GET", `/api/reservations/${encodeURIComponent(id)}`),
  // Who this browser is to the shop (the cookie is set on the first visit) and its units
  // of each product, which count against a product's limit per customer.
  me: () => request("GET", "/api/me"),
  // This shopper's holds still running, newest first: what a page restores.
  myActiveHolds: () => request("GET", "/api/me/reservations?status=ACTIVE"),
  reserve: (productId, quantity, key) =>
    request("POST", "/api/reservations", {
      body: { productId, quantity },
      headers: { "Idempotency-Key": key },
    }),
  complete: (id) => request("POST", `/api/reservations/${encodeURIComponent(id)}/complete`),
  cancel: (id) => request("POST", `/api/reservations/${encodeURIComponent(id)}/cancel`),
  // The waiting room of a product with a queue (issue 17): join (201, or 200 with the same
  // ticket again), read this shopper's ticket (with If-None-Match: 304 when unchanged; 404
  // `no_ticket` when they have none), leave (204).
  joinQueue: (productId) => request("POST", `/api/products/${encodeURIComponent(productId)}/queue`),
  ticket: (productId, etag) =>
    request("GET", `/api/products/${encodeURIComponent(productId)}/queue`, { etag }),
  // How many wait in the waiting rooms of these products (query "ids=3,8"; "": every one)
  // and hold a pass, what the socket's `queue` frames carry: [{productId, waiting, admitted}].
  queues: (etag, query = "") => request("GET", query ? `/api/queues?${query}` : "/api/queues", { etag }),
  leaveQueue: (productId) => request("DELETE", `/api/products/${encodeURIComponent(productId)}/queue`),
};
