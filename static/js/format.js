// Numbers, money, durations and times as the reader expects them: in their own locale
// (the browser's), and times in their own zone unless a zone is asked for.

// Money in the shop's currency (CURRENCY on the server, `currency` in /api/config).
export class Money {
  constructor(currency = "EUR") {
    this.currency = currency;
    try {
      this.format = new Intl.NumberFormat(undefined, { style: "currency", currency });
    } catch {
      // A code this browser does not know: the amount and the code, plainly.
      const number = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
      this.format = { format: (amount) => `${number.format(amount)} ${currency}` };
    }
  }

  // `price` is in whole units of the currency, exact to the cent (the API's `price`).
  text(price) {
    return this.format.format(Number(price));
  }

  // `quantity` × `price`, added in cents so that 3 × 19.99 is 59.97, not 59.970000000000006.
  total(price, quantity) {
    return this.format.format((Math.round(Number(price) * 100) * quantity) / 100);
  }
}

// 95_000 → "01:35"; 3_725_000 → "1:02:05". Rounded up: "00:01" until the time is up.
export function formatDuration(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = total % 60;
  const mmss = `${String(minutes).padStart(2, "0")}:${String(seconds).padStart(2, "0")}`;
  return hours ? `${hours}:${mmss}` : mmss;
}

// A wait in words, rounded as a person would say it: "under a minute", "about 3 minutes",
// "about 1 hour 20 minutes".
export function formatWait(ms) {
  const minutes = Math.round(ms / 60_000);
  if (minutes < 1) return "under a minute";
  if (minutes < 60) return `about ${minutes} ${minutes === 1 ? "minute" : "minutes"}`;
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  const h = `${hours} ${hours === 1 ? "hour" : "hours"}`;
  return rest ? `about ${h} ${rest} ${rest === 1 ? "minute" : "minutes"}` : `about ${h}`;
}

// How far ahead a time is, in words fit for a start: "in 04:59", "in 5:12:09", "in 3 days".
export function formatIn(ms) {
  if (ms >= 48 * 3600_000) {
    const days = Math.floor(ms / (24 * 3600_000));
    return `in ${new Intl.NumberFormat(undefined).format(days)} days`;
  }
  return `in ${formatDuration(ms)}`;
}

// A moment as a date and time with its zone: "Thu, 1 Jan 2099, 09:00 GMT+9" (en-GB, Tokyo).
// `timeZone` undefined: the reader's own zone. The year only when it is not this year's.
export function formatMoment(ms, { timeZone, withYear } = {}) {
  const date = new Date(ms);
  const year = withYear ?? date.getFullYear() !== new Date().getFullYear();
  return new Intl.DateTimeFormat(undefined, {
    weekday: "short",
    day: "numeric",
    month: "short",
    year: year ? "numeric" : undefined,
    hour: "2-digit",
    minute: "2-digit",
    timeZone,
    timeZoneName: "short",
  }).format(date);
}

// A time of day to the second, in the reader's zone: "14:02:11".
export function formatClock(ms) {
  return new Intl.DateTimeFormat(undefined, {
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  }).format(new Date(ms));
}

// The reader's own zone, by name: "Europe/Paris" (or "UTC" where the browser cannot say).
export function localZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

export function formatCount(n) {
  return Number(n).toLocaleString();
}
