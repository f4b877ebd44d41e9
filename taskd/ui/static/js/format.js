// Numbers as people read them.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function bytes(value) {
  if (value === null || value === undefined) return "–";
  let n = Number(value);
  let unit = 0;
  while (Math.abs(n) >= 1024 && unit < UNITS.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return `${n.toFixed(unit && n < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

export function rate(value) {
  return value === null || value === undefined ? "–" : `${bytes(value)}/s`;
}

export function percent(part, whole) {
  if (part === null || part === undefined || !whole) return null;
  return (100 * part) / whole;
}

export function pct(value) {
  return value === null || value === undefined ? "–" : `${value.toFixed(1)} %`;
}

export function ago(ms, now = Date.now()) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "–";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const d = Math.floor(seconds / 86400);
  const hh = Math.floor((seconds % 86400) / 3600);
  const mm = Math.floor((seconds % 3600) / 60);
  return d ? `${d} d ${hh} h` : `${hh} h ${mm} min`;
}
