// The console's "Shop integration" panel: the books (reconciliation), webhook endpoints and
// their recent deliveries (redeliver one), and the shop's API keys. Secrets and keys are
// shown once, when made. It runs beside admin.js and uses the operator token admin.js keeps.

import { ApiError, parseTime, request, sentenceFor } from "./api.js";
import { formatMoment } from "./format.js";

const TOKEN_KEY = "flashsale.adminToken";
const REFRESH_MS = 5000;
const $ = (selector, root = document) => root.querySelector(selector);

function cell(text, className) {
  const td = document.createElement("td");
  td.setAttribute("role", "cell");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function button(text, onClick, label, className = "secondary") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function when(iso) {
  return iso ? formatMoment(parseTime(iso)) : "—";
}

class Integrations {
  constructor() {
    this.endpoints = [];
    this.selected = null; // endpoint id whose deliveries are shown
    this.timer = null;
    $("#webhook-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.createEndpoint(event.target);
    });
    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.createKey(event.target);
    });
    $("#reconcile").addEventListener("click", () => this.reconcile());
    // Shown once admin.js has signed in (it un-hides #console); hidden again on sign-out.
    const consoleView = $("#console");
    new MutationObserver(() => this.visibility(!consoleView.hidden)).observe(consoleView, {
      attributes: true,
      attributeFilter: ["hidden"],
    });
    this.visibility(!consoleView.hidden);
  }

  visibility(shown) {
    clearInterval(this.timer);
    this.timer = null;
    if (!shown) return;
    this.refresh();
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  call(method, path, body) {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    return request(method, path, { body, headers: { Authorization: `Bearer ${token}` } });
  }

  say(selector, text, good = true) {
    const message = $(selector);
    message.textContent = text;
    message.classList.toggle("bad", !good);
  }

  async refresh() {
    try {
      const [{ data: endpoints }, { data: keys }] = await Promise.all([
        this.call("GET", "/api/admin/webhooks"),
        this.call("GET", "/api/admin/shop-keys"),
      ]);
      this.endpoints = endpoints;
      this.renderEndpoints();
      this.renderKeys(keys);
      if (this.selected !== null) await this.loadDeliveries(this.selected);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) {
        this.say("#webhook-message", sentenceFor(error), false);
      }
    }
  }

  // -- the books -------------------------------------------------------------------------

  async reconcile() {
    this.say("#books-message", "Checking…");
    try {
      const { data } = await this.call("GET", "/api/admin/reconcile");
      const count = data.products.length;
      if (data.ok) {
        this.say(
          "#books-message",
          `The books add up: every movement of ${count} product${count === 1 ? "" : "s"} ` +
            `accounts for its stock and its holds (checked ${when(data.checkedAt)}).`,
        );
      } else {
        const names = data.products
          .filter((p) => !p.ok)
          .map((p) => `product ${p.productId}: ${p.problems.join(" ")}`);
        this.say("#books-message", `Out of balance — ${names.join("; ")}`, false);
      }
    } catch (error) {
      this.say("#books-message", sentenceFor(error), false);
    }
  }

  // -- webhook endpoints -----------------------------------------------------------------

  async createEndpoint(form) {
    const events = [...form.querySelectorAll("input[name=events]:checked")].map((i) => i.value);
    try {
      const { data } = await this.call("POST", "/api/admin/webhooks", {
        url: form.elements.url.value.trim(),
        events,
        description: form.elements.description.value.trim(),
      });
      form.reset();
      this.showSecret(data, "Endpoint added.");
      await this.refresh();
    } catch (error) {
      this.say("#webhook-message", sentenceFor(error), false);
    }
  }

  showSecret(endpoint, what) {
    $("#webhook-secret").hidden = false;
    $("#webhook-secret-value").textContent = endpoint.secret;
    this.say(
      "#webhook-message",
      `${what} Its signing secret is below: copy it into the shop's configuration now; ` +
        "it is not shown again.",
    );
  }

  renderEndpoints() {
    const rows = $("#webhook-rows");
    rows.replaceChildren();
    for (const endpoint of this.endpoints) {
      const tr = document.createElement("tr");
      tr.setAttribute("role", "row");
      tr.dataset.id = endpoint.id;
      const th = document.createElement("th");
      th.setAttribute("role", "rowheader");
      th.scope = "row";
      th.className = "url";
      th.textContent = endpoint.url;
      if (endpoint.description) {
        const small = document.createElement("span");
        small.className = "hint block";
        small.textContent = endpoint.description;
        th.append(small);
      }
      tr.append(th);
      tr.append(cell(endpoint.events.length ? endpoint.events.join(", ") : "all events"));
      let state = endpoint.enabled ? "Enabled" : `Disabled: ${endpoint.disabledReason || ""}`;
      if (endpoint.enabled && endpoint.failingSince) {
        state = `Failing since ${when(endpoint.failingSince)}, retrying`;
      }
      tr.append(cell(state, endpoint.enabled && !endpoint.failingSince ? "state" : "state bad"));
      tr.append(cell(String(endpoint.pending), "num"));
      const actions = document.createElement("td");
      actions.setAttribute("role", "cell");
      actions.className = "actions";
      actions.append(
        button(
          endpoint.enabled ? "Disable" : "Enable",
          () => this.switchEndpoint(endpoint, !endpoint.enabled),
          `${endpoint.enabled ? "Disable" : "Enable"} ${endpoint.url}`,
        ),
        button("Rotate secret", () => this.rotate(endpoint), `Rotate secret of ${endpoint.url}`),
        button("Delete", () => this.deleteEndpoint(endpoint), `Delete ${endpoint.url}`, "secondary danger"),
        button(
          "Deliveries",
          () => this.loadDeliveries(endpoint.id, true),
          `Deliveries to ${endpoint.url}`,
          "link",
        ),
      );
      tr.append(actions);
      rows.append(tr);
    }
    $("#webhooks-empty").hidden = this.endpoints.length > 0;
  }

  async switchEndpoint(endpoint, enabled) {
    try {
      await this.call("POST", `/api/admin/webhooks/${endpoint.id}/${enabled ? "enable" : "disable"}`);
      this.say("#webhook-message", `${endpoint.url} ${enabled ? "enabled" : "disabled"}.`);
      await this.refresh();
    } catch (error) {
      this.say("#webhook-message", sentenceFor(error), false);
    }
  }

  async deleteEndpoint(endpoint) {
    const waiting = endpoint.pending
      ? ` Its ${endpoint.pending} waiting deliver${endpoint.pending === 1 ? "y is" : "ies are"} dropped, never sent.`
      : "";
    if (!window.confirm(`Delete ${endpoint.url} and its delivery history?${waiting}`)) return;
    this.say("#webhook-message", `Deleting ${endpoint.url}…`);
    try {
      await this.call("DELETE", `/api/admin/webhooks/${endpoint.id}`);
      if (this.selected === endpoint.id) {
        this.selected = null;
        $("#deliveries").hidden = true;
      }
      this.say("#webhook-message", `${endpoint.url} deleted: nothing more is sent to it.`);
      await this.refresh();
    } catch (error) {
      this.say("#webhook-message", sentenceFor(error), false);
    }
  }

  async rotate(endpoint) {
    try {
      const { data } = await this.call("POST", `/api/admin/webhooks/${endpoint.id}/rotate-secret`);
      this.showSecret(
        data,
        "New secret made; the one it replaces keeps signing beside it for a day (at most three sign at once).",
      );
    } catch (error) {
      this.say("#webhook-message", sentenceFor(error), false);
    }
  }

  async loadDeliveries(endpointId, focus = false) {
    this.selected = endpointId;
    const endpoint = this.endpoints.find((e) => e.id === endpointId);
    $("#deliveries").hidden = false;
    $("#deliveries-title").textContent = `Recent deliveries to ${endpoint ? endpoint.url : "…"}`;
    const { data } = await this.call("GET", `/api/admin/webhooks/${endpointId}/deliveries?limit=50`);
    const rows = $("#delivery-rows");
    rows.replaceChildren();
    for (const d of data) {
      const tr = document.createElement("tr");
      tr.setAttribute("role", "row");
      tr.dataset.event = d.eventId;
      tr.append(cell(d.type), cell(String(d.productId), "num"), cell(when(d.createdAt)));
      const status =
        d.status === "delivered"
          ? `Delivered ${when(d.deliveredAt)}`
          : d.status === "redelivering"
            ? "Sending again"
            : d.attempts
              ? `Retrying: ${d.lastError || `HTTP ${d.lastStatus}`}`
              : "Waiting";
      tr.append(cell(status, d.status === "pending" && d.attempts ? "state bad" : "state"));
      tr.append(cell(String(d.attempts), "num"));
      const actions = document.createElement("td");
      actions.setAttribute("role", "cell");
      // A delivered event is sent once more; a waiting one is tried now, not after its backoff.
      const again = d.status === "pending" ? "Retry now" : "Redeliver";
      actions.append(
        button(again, () => this.redeliver(endpointId, d), `${again} ${d.type} ${d.eventId}`),
      );
      tr.append(actions);
      rows.append(tr);
    }
    $("#deliveries-empty").hidden = data.length > 0;
    if (focus) $("#deliveries-title").focus();
  }

  async redeliver(endpointId, delivery) {
    try {
      await this.call(
        "POST",
        `/api/admin/webhooks/${endpointId}/deliveries/${encodeURIComponent(delivery.eventId)}/redeliver`,
      );
      this.say("#deliveries-message", `${delivery.type} ${delivery.eventId} will be sent again.`);
      await this.loadDeliveries(endpointId);
    } catch (error) {
      this.say("#deliveries-message", sentenceFor(error), false);
    }
  }

  // -- shop API keys ---------------------------------------------------------------------

  async createKey(form) {
    try {
      const { data } = await this.call("POST", "/api/admin/shop-keys", {
        name: form.elements.name.value.trim(),
      });
      form.reset();
      $("#key-secret").hidden = false;
      $("#key-secret-value").textContent = data.key;
      this.say(
        "#key-message",
        `Key "${data.name}" made. Copy it into the shop's backend now; it is not shown again.`,
      );
      await this.refresh();
    } catch (error) {
      this.say("#key-message", sentenceFor(error), false);
    }
  }

  renderKeys(keys) {
    const rows = $("#key-rows");
    rows.replaceChildren();
    for (const key of keys) {
      const tr = document.createElement("tr");
      tr.setAttribute("role", "row");
      tr.append(cell(key.name), cell(`${key.prefix}…`, "mono"), cell(when(key.createdAt)));
      tr.append(cell(key.revokedAt ? `Revoked ${when(key.revokedAt)}` : "Active"));
      const actions = document.createElement("td");
      actions.setAttribute("role", "cell");
      if (!key.revokedAt) {
        actions.append(button("Revoke", () => this.revoke(key), `Revoke the key ${key.name}`));
      }
      tr.append(actions);
      rows.append(tr);
    }
    $("#keys-empty").hidden = keys.length > 0;
  }

  async revoke(key) {
    try {
      await this.call("POST", `/api/admin/shop-keys/${key.id}/revoke`);
      this.say("#key-message", `Key "${key.name}" revoked.`);
      await this.refresh();
    } catch (error) {
      this.say("#key-message", sentenceFor(error), false);
    }
  }
}

new Integrations();
