// Text helpers with no page in them: links, colours, mentions, times, chatctl/1's escapes.
// Nothing here makes HTML: the page puts every piece of chat text in with textContent.

const LINK = /\b(?:https?:\/\/|mailto:)[^\s<>"'`]+/giu;
const TRAILING = /[.,;:!?)\]}'"»”’]+$/u;
const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);

/** The pieces of `text`: plain strings and {href, text} for the links it has (http, https, mailto only). */
export function linkPieces(text) {
  const pieces = [];
  let last = 0;
  for (const match of text.matchAll(LINK)) {
    let url = match[0];
    const trailing = url.match(TRAILING);
    if (trailing && !(trailing[0].startsWith(")") && url.includes("("))) url = url.slice(0, -trailing[0].length);
    const href = safeHref(url);
    if (!href) continue;
    if (match.index > last) pieces.push(text.slice(last, match.index));
    pieces.push({ href, text: url });
    last = match.index + url.length;
  }
  if (last < text.length) pieces.push(text.slice(last));
  return pieces;
}

/** `url` as a link's href when its scheme is one a link may have; null otherwise (javascript:, data:...). */
export function safeHref(url) {
  try {
    const parsed = new URL(url);
    return SAFE_SCHEMES.has(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

/** A stable colour class for a name (one of 16): the same name is the same colour on every screen. */
export function nameColour(name) {
  let hash = 2166136261;
  for (const ch of name.toLowerCase()) {
    hash ^= ch.codePointAt(0);
    hash = Math.imul(hash, 16777619) >>> 0;
  }
  return `c${hash % 16}`;
}

const WORD = "[\\p{L}\\p{N}_]";

/** Whether `text` names `name` as a word of its own, any case (as the server counts mentions). */
export function mentions(text, name) {
  if (!name) return false;
  const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");  // (a "-" escaped is an error with "u")
  return new RegExp(`(?<!${WORD})${escaped}(?!${WORD})`, "iu").test(text);
}

/** chatctl/1's escapes for a message's text: a backslash doubled, a line break as \n. */
export function escapeText(text) {
  return text.replace(/\\/g, "\\\\").replace(/\r?\n/g, "\\n");
}

/** A timestamp (UTC seconds) as this browser's local time: 14:05, or a date for older days. */
export function localTime(ts, now = Date.now()) {
  const when = new Date(ts * 1000);
  const today = new Date(now);
  const sameDay = when.toDateString() === today.toDateString();
  const time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return sameDay ? time : `${when.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

export function fullTime(ts) {
  return new Date(ts * 1000).toLocaleString();
}
