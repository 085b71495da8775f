// The shop page's DOM. Two doors: bind(event, handler) and render(command, data).
// Every value from the server reaches the page through textContent or an attribute, never
// as HTML.

const $ = (selector, root = document) => root.querySelector(selector);

const CONNECTION_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  polling: "Updating every few seconds",
};

const OUTCOMES = {
  COMPLETED: "Purchased. Thank you!",
  CANCELLED: "Cancelled: the units are back on sale.",
  EXPIRED: "This hold expired: its units went back on sale.",
};

export function formatPrice(price) {
  return Number(price).toFixed(2);
}

export function formatDuration(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = total % 60;
  const mmss = `${String(minutes).padStart(2, "0")}:${String(seconds).padStart(2, "0")}`;
  return hours ? `${hours}:${mmss}` : mmss;
}

export class ShopView {
  constructor() {
    this.products = $("#products");
    this.holds = $("#holds");
    this.holdsSection = $("#holds-section");
    this.connection = $("#connection");
    this.notice = $("#notice");
    this.announcer = $("#announcer");
    this.productTemplate = $("#product-template");
    this.holdTemplate = $("#hold-template");
    this.handlers = {};
    this.maxQuantity = 10;

    this.products.addEventListener("submit", (event) => {
      event.preventDefault();
      const card = event.target.closest(".product");
      const quantity = Number(event.target.elements.quantity.value);
      this.handlers.reserve?.(Number(card.dataset.id), quantity);
    });
    this.holds.addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) return;
      const id = button.closest(".hold").dataset.id;
      for (const action of ["complete", "cancel", "dismiss"]) {
        if (button.classList.contains(action)) this.handlers[action]?.(id);
      }
    });
  }

  bind(event, handler) {
    this.handlers[event] = handler;
  }

  render(command, data) {
    switch (command) {
      case "config":
        this.maxQuantity = data.maxQuantity;
        break;
      case "products":
        $("#loading").hidden = true;
        for (const product of data) this.renderProduct(product);
        break;
      case "product":
        this.renderProduct(data.product, data.changed);
        break;
      case "hold":
        this.renderHold(data);
        break;
      case "removeHold":
        this.holds.querySelector(`[data-id="${CSS.escape(data)}"]`)?.remove();
        this.holdsSection.hidden = !this.holds.children.length;
        break;
      case "tick":
        this.tick(data.now, data.paused);
        break;
      case "connection":
        this.connection.dataset.state = data;
        $(".label", this.connection).textContent = CONNECTION_LABELS[data] || data;
        break;
      case "productBusy":
        this.setBusy(this.productCard(data.id), data.busy, "Reserving…", "Reserve");
        break;
      case "holdBusy":
        for (const button of this.holdItem(data.id)?.querySelectorAll(".actions button") || []) {
          button.disabled = data.busy;
        }
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
    return this.products.querySelector(`[data-id="${CSS.escape(String(id))}"]`);
  }

  holdItem(id) {
    return this.holds.querySelector(`[data-id="${CSS.escape(id)}"]`);
  }

  renderProduct(product, changed = false) {
    let card = this.productCard(product.id);
    if (!card) {
      card = this.productTemplate.content.firstElementChild.cloneNode(true);
      card.dataset.id = product.id;
      const select = $("select", card);
      for (let q = 1; q <= this.maxQuantity; q += 1) select.append(new Option(String(q), String(q)));
      const nameId = `product-${product.id}-name`;
      $(".name", card).id = nameId;
      card.setAttribute("aria-labelledby", nameId);
      $(".meter", card).setAttribute("aria-labelledby", nameId);
      this.insertInOrder(card, product.id);
    }
    $(".name", card).textContent = product.name;
    $(".price", card).textContent = formatPrice(product.price);
    const left = product.availableStock;
    const total = product.totalStock.toLocaleString();
    $(".count", card).textContent = left > 0 ? `${left.toLocaleString()} of ${total} left` : "Sold out";
    const meter = $(".meter", card);
    meter.setAttribute("aria-valuemax", String(product.totalStock));
    meter.setAttribute("aria-valuenow", String(left));
    meter.setAttribute("aria-valuetext", `${left.toLocaleString()} of ${total} left`);
    const share = product.totalStock ? left / product.totalStock : 0;
    $(".fill", card).style.width = `${Math.round(share * 100)}%`;
    card.classList.toggle("sold-out", left <= 0);
    card.dataset.startsAt = product.saleStartsAt || "";
    if (changed) {
      card.classList.remove("changed");
      void card.offsetWidth; // restart the animation
      card.classList.add("changed");
    }
  }

  insertInOrder(card, id) {
    const after = [...this.products.children].find((other) => Number(other.dataset.id) > id);
    this.products.insertBefore(card, after || null);
  }

  renderHold({ reservation, name, tentative }) {
    let item = this.holdItem(reservation.id);
    if (!item) {
      item = this.holdTemplate.content.firstElementChild.cloneNode(true);
      item.dataset.id = reservation.id;
      this.holds.prepend(item);
    }
    this.holdsSection.hidden = false;
    item.dataset.status = reservation.status;
    item.dataset.expiresAt = reservation.expiresAt;
    $(".what", item).textContent = `${reservation.quantity} × ${name}`;
    const active = reservation.status === "ACTIVE" && !tentative;
    $(".left", item).hidden = !active;
    $(".outcome", item).textContent = active
      ? ""
      : tentative
        ? OUTCOMES.EXPIRED
        : OUTCOMES[reservation.status] || reservation.status;
    $(".complete", item).hidden = !active;
    $(".cancel", item).hidden = !active;
    $(".dismiss", item).hidden = active;
    if (!active) $(".error", item).hidden = true;
  }

  tick(now, paused) {
    for (const item of this.holds.children) {
      if (item.dataset.status !== "ACTIVE") continue;
      const left = Date.parse(item.dataset.expiresAt) - now;
      $(".countdown", item).textContent = formatDuration(left);
      item.classList.toggle("ending", left < 30_000);
    }
    for (const card of this.products.children) {
      const startsAt = card.dataset.startsAt ? Date.parse(card.dataset.startsAt) : null;
      const waiting = startsAt !== null && startsAt > now;
      const starts = $(".starts", card);
      starts.hidden = !waiting;
      if (waiting) starts.textContent = `Starts in ${formatDuration(startsAt - now)}`;
      card.classList.toggle("not-started", waiting);
      const button = $("button", card);
      if (!card.classList.contains("busy")) {
        button.disabled = waiting || paused || card.classList.contains("sold-out");
      }
    }
  }

  setBusy(element, busy, busyLabel, idleLabel) {
    if (!element) return;
    element.classList.toggle("busy", busy);
    const button = $("button", element);
    button.disabled = busy;
    button.textContent = busy ? busyLabel : idleLabel;
  }

  showError(element, message) {
    if (!element) return;
    const error = $(".error", element);
    error.textContent = message || "";
    error.hidden = !message;
  }
}
