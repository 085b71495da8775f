// The connection indicator both pages show in their header: what the live feed's state
// means, and, when the shop cannot be reached, since when what is shown may be stale.

import { formatClock } from "./format.js";
import { CONNECTION_LABELS } from "./live.js";

// `element`: the `#connection` paragraph (a status region); `lastHeard`: Date.now() when
// the page last knew its figures were current, or null.
export function renderConnection(element, state, lastHeard) {
  element.dataset.state = state;
  element.querySelector(".label").textContent = CONNECTION_LABELS[state] || state;
  let detail = "";
  if (state === "offline") detail = lastHeard ? `Stock as of ${formatClock(lastHeard)}` : "Retrying…";
  element.querySelector(".detail").textContent = detail;
}
