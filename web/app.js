// The page: the login, then the chat drawn from the model (model.js), and what a person types and
// clicks turned into the model's requests.  Chat text is only ever put in with textContent.

import { ACTIONS, ChatModel, MAIN } from "./model.js";
import { fullTime, linkPieces, localTime, mentions, nameColour } from "./text.js";

const $ = (id) => document.getElementById(id);
const NARROW = window.matchMedia("(max-width: 700px)");
const GROUP_SECONDS = 300;
const NAME = /^[\p{L}\p{N}_.-]{1,32}$/u;
const ROOM = /^#?[a-z0-9][a-z0-9_-]{0,29}$/;
const COMMANDS = {
  "/join": "/join #room… [--private]  join rooms (a new one is made; --private: invite-only)",
  "/part": "/part [#room] [--forget] [reason]  leave a room (--forget: for good, a member no more)",
  "/msg": "/msg NAME [text]  a direct message (or open the conversation)",
  "/me": "/me action  an action: * you action",
  "/topic": "/topic [text]  show this room's topic, or set it",
  "/names": "/names  who is in this room",
  "/who": "/who  who is online",
  "/rooms": "/rooms  every room (the switcher, as Ctrl-K)",
  "/invite": "/invite NAME  let NAME into this private room (or tell NAME of it)",
  "/kick": "/kick NAME [why]  put NAME out of this room (an operator's)",
  "/ban": "/ban NAME|PATTERN [for] [why]  keep NAME (or spam*) out, for 10m, 2h, 7d (none: ever)",
  "/unban": "/unban PATTERN  lift a ban (/mode +b lists them)",
  "/mute": "/mute NAME [for]  NAME may not speak here",
  "/unmute": "/unmute NAME  NAME may speak again",
  "/op": "/op NAME  make NAME an operator of this room (its owner's)",
  "/deop": "/deop NAME  NAME is an operator no more",
  "/mode": "/mode [+i|-i|+t|-t|+m|-m|+b]  this room's flags: private, topic locked, moderated; +b: bans",
  "/search": "/search words  find messages (Ctrl-K switches conversations)",
  "/re": "/re ID text  reply to message ID (or Reply beside a message)",
  "/react": "/react ID emoji  react to message ID (again: take it back)",
  "/edit": "/edit ID text  change your message ID (or Up on an empty box: your last one)",
  "/delete": "/delete ID  delete your message ID",
  "/nick": "/nick NAME  use another name (a free one)",
  "/register": "/register  protect your name with a password",
  "/logout": "/logout [--others]  log this browser out (or, with the password, every other device)",
  "/help": "/help  this list",
};

let model = null;
let sessionInfo = null;
let hit = { key: "", id: 0 };  // the search hit shown (highlighted until another is)
let composing = null;  // {verb: "REPLY" or "EDIT", msg}: what the box's next Enter does, instead of a message
const QUICK_REACTIONS = ["👍", "❤️", "😂", "🎉", "👀", "✅"];
const notices = new Map();  // conversation -> notices shown after a message id: [{after, text, error}]

// --- the login ------------------------------------------------------------------------------------

async function api(path, body) {
  const options = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) };
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store", ...options });
  let data = {};
  try {
    data = await response.json();
  } catch {
    // an answer that is not JSON (a proxy's page): its status says enough
  }
  return { ok: response.ok, status: response.status, data };
}

function showLogin(message = "", name = "") {
  $("chat").hidden = true;
  $("login").hidden = false;
  $("server-password-row").hidden = !(sessionInfo && sessionInfo.server_password);
  $("login-error").textContent = message;
  if (name) $("login-name").value = name;
  $("login-password").value = "";
  (name ? $("login-password") : $("login-name")).focus();
  document.title = "chatctl";
  performance.mark("chatctl-login");  // (benchmarks/bench_web.py reads it: the time to the login)
}

async function logIn(event) {
  event.preventDefault();
  const name = $("login-name").value.trim();
  if (!NAME.test(name)) {
    $("login-error").textContent = "A name is one word of up to 32 letters and digits (and '_', '-' or " +
      "'.'), with no spaces: maria.lopez, say.";
    return;
  }
  $("login-button").disabled = true;
  try {
    const answer = await api("/api/login", { name, password: $("login-password").value,
      server_password: $("login-server-password").value });
    if (!answer.ok) {
      $("login-error").textContent = answer.data.message || `The server said ${answer.status}.`;
      if (answer.data.error === "name-protected") $("login-password").focus();
      return;
    }
    $("login-password").value = "";
    startChat(answer.data.name, answer.data.protected);
  } catch {
    $("login-error").textContent = "The server cannot be reached; try again in a moment.";
  } finally {
    $("login-button").disabled = false;
  }
}

// --- the chat -----------------------------------------------------------------------------------------

function startChat(name, isProtected = false) {
  if (model) model.close();
  notices.clear();
  model = new ChatModel();
  model.name = name;
  model.protected = isProtected;
  model.visible = !document.hidden;
  $("login").hidden = true;
  $("chat").hidden = false;
  $("me-name").textContent = name;
  for (const what of ["conversations", "messages", "members", "status", "notice", "search", "older", "jump",
    "alert", "retry", "who", "protected"]) {
    model.addEventListener(what, (e) => VIEWS[what](e.detail));
  }
  model.connect();
  drawAll();
  $("input").focus();
}

let drawnActive = "";

const VIEWS = {
  conversations: () => {
    if (model.active !== drawnActive) {  // switched (a room joined, a search hit): everything is another's
      drawAll();
      return;
    }
    drawSidebar();
    drawHeader();
    drawTitle();
  },
  messages: (d) => { if (d.key === model.active) drawMessages(d.live ? "append" : "keep"); },
  members: (d) => { if (d.key === model.active) drawMembers(); },
  status: () => drawStatus(),
  notice: (d) => addNotice(d),
  search: () => drawSearch(),
  older: (d) => { if (d.key === model.active) drawMessages("keep"); },
  jump: (d) => { hit = { key: d.key, id: d.id }; drawAll(); highlight(d.id); },
  alert: (d) => notify(d),
  retry: () => retry(),
  who: (d) => addNotice({ key: model.active, text: "online: " + d.users.map((u) => u.name).join(", ") }),
  protected: () => {
    $("protect-result").textContent = "Your name is protected: other browsers and terminals need its password now.";
    $("protect-form").hidden = true;
    $("logout-others-form").hidden = false;
    addNotice({ key: model.active, text: `${model.name} is protected now; this browser stays logged in` });
  },
};

function drawAll() {
  drawnActive = model.active;
  drawSidebar();
  drawHeader();
  drawMessages("bottom");
  drawMembers();
  drawStatus();
  drawTitle();
}

function drawTitle() {
  const unread = model.totalUnread;
  const conv = model.conversation(model.active);
  document.title = `${unread ? `(${unread}) ` : ""}${conv.key} – chatctl`;
  const badge = $("menu-badge");
  badge.hidden = !unread;
  badge.textContent = unread > 99 ? "99+" : String(unread);
  badge.classList.toggle("mention", model.totalMentions > 0);
}

function drawSidebar() {
  const nav = $("conversations");
  nav.replaceChildren();
  let section = "";
  model.ordered().forEach((conv, i) => {
    if (conv.kind !== section) {
      section = conv.kind;
      const heading = document.createElement("h4");
      heading.textContent = conv.kind === "room" ? "Rooms" : "Direct messages";
      nav.append(heading);
    }
    const item = document.createElement("button");
    item.className = "conv" + (conv.key === model.active ? " active" : "") + (conv.unread ? " unread" : "");
    item.dataset.key = conv.key;
    item.title = i < 9 ? `Alt-${i + 1}` : "";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = conv.kind === "room" ? "#" + conv.name : conv.name;
    item.append(label);
    if (conv.mentions || (conv.kind === "dm" && conv.unread)) {
      const badge = document.createElement("span");
      badge.className = "badge mention";
      badge.textContent = conv.kind === "dm" ? conv.unread : "@" + conv.mentions;
      item.append(badge);
    }
    if (conv.unread && conv.kind === "room") {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = conv.unread > 999 ? "999+" : conv.unread;
      item.append(badge);
    }
    item.addEventListener("click", () => switchTo(conv.key));
    nav.append(item);
  });
}

function drawHeader() {
  const conv = model.conversation(model.active);
  $("conv-title").textContent = conv.kind === "room" ? "#" + conv.name : conv.name;
  $("conv-topic").textContent = conv.kind === "room" ? conv.topic : "direct messages";
  $("input").placeholder = conv.kind === "room" ? `Message #${conv.name}` : `Message ${conv.name}`;
  $("latest-button").hidden = !conv.detached;
}

function drawMembers() {
  const conv = model.conversation(model.active);
  const list = $("member-list");
  list.replaceChildren();
  if (conv.kind === "dm") conv.members = new Map([[model.name, {}], [conv.name, {}]]);
  const names = [...conv.members.keys()].sort((a, b) => a.localeCompare(b));
  $("member-count").textContent = conv.kind === "room" ? `(${names.length})` : "";
  for (const name of names) {
    const info = conv.members.get(name);
    const item = document.createElement("li");
    const who = document.createElement("button");
    who.className = "member " + nameColour(name);
    who.textContent = name;
    who.title = `Message ${name}`;
    who.addEventListener("click", () => openDm(name));
    item.append(who);
    if (info.role) item.append(tag(info.role));  // the room's owner, an operator, a voice
    if (info.bot) item.append(tag("bot"));
    if (info.devices > 1) item.append(tag(`${info.devices} devices`));
    list.append(item);
  }
}

function tag(text) {
  const span = document.createElement("span");
  span.className = "tag";
  span.textContent = text;
  return span;
}

function messageRow(msg) {
  const row = document.createElement("div");
  row.className = "msg" + (msg.kind === "me" ? " action" : "");
  row.dataset.id = msg.id;
  if (msg.sender !== model.name && mentions(msg.text, model.name)) row.classList.add("mention");
  if (msg.id === hit.id && model.keyOf(msg) === hit.key) row.classList.add("hit");
  const time = document.createElement("time");
  time.textContent = localTime(msg.ts);
  time.title = fullTime(msg.ts);
  time.dateTime = new Date(msg.ts * 1000).toISOString();
  const sender = document.createElement("span");
  sender.className = "sender " + nameColour(msg.sender);
  sender.textContent = msg.kind === "me" ? `* ${msg.sender}` : msg.sender;
  time.title = `${fullTime(msg.ts)} · #${msg.id}`;
  const text = document.createElement("span");
  text.className = "text";
  if (msg.ref) text.append(quoteOf(msg.ref));
  if (msg.deleted) {
    row.classList.add("deleted");
    const gone = document.createElement("span");
    gone.className = "gone";
    gone.textContent = "message deleted";
    text.append(gone);
    row.append(time, sender, text);
    return row;
  }
  for (const piece of linkPieces(msg.text)) {
    if (typeof piece === "string") {
      text.append(piece);
    } else {
      const link = document.createElement("a");
      link.href = piece.href;
      link.textContent = piece.text;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      text.append(link);
    }
  }
  if (msg.edited) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.textContent = " (edited)";
    edited.title = `edited ${fullTime(msg.edited)}`;
    text.append(edited);
  }
  if (msg.reactions && msg.reactions.length) {
    const box = document.createElement("div");
    box.className = "reactions";
    for (const [reaction, names] of msg.reactions) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "reaction" + (names.includes(model.name) ? " mine" : "");
      chip.textContent = `${reaction} ${names.length}`;
      chip.title = names.join(", ");
      chip.addEventListener("click", () => model.act("REACT", msg.id, reaction));
      box.append(chip);
    }
    text.append(box);
  }
  row.append(time, sender, text, actionsOf(msg));
  // a phone has no hover: a tap on a message shows its buttons
  row.addEventListener("click", (e) => { if (NARROW.matches && !e.target.closest("button, a")) row.classList.toggle("picked"); });
  return row;
}

/** What a reply answers, above its text: "↳ bob: deploy done" (a click shows it). */
function quoteOf(id) {
  const target = model.find(id);
  const quote = document.createElement("button");
  quote.type = "button";
  quote.className = "quote";
  quote.textContent = !target ? "↳ an earlier message" : target.deleted ? `↳ ${target.sender}: message deleted`
    : `↳ ${target.sender}: ${target.text.split("\n")[0].slice(0, 80)}`;
  quote.addEventListener("click", () => highlight(id));
  return quote;
}

/** The buttons a message shows on hover: reply, react, and for our own edit and delete. */
function actionsOf(msg) {
  const box = document.createElement("span");
  box.className = "msg-actions";
  const button = (label, title, then) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.setAttribute("aria-label", title);
    b.addEventListener("click", then);
    box.append(b);
    return b;
  };
  button("↩", "Reply", () => compose("REPLY", msg));
  for (const reaction of QUICK_REACTIONS.slice(0, 3)) button(reaction, `React ${reaction}`, () => model.act("REACT", msg.id, reaction));
  button("☺+", "React with…", () => {
    const reaction = prompt("React with (an emoji, or a short word):", QUICK_REACTIONS[3]);
    if (reaction && reaction.trim()) model.act("REACT", msg.id, reaction.trim());
  });
  if (msg.sender === model.name && msg.kind !== "me") button("✎", "Edit", () => compose("EDIT", msg));
  if (msg.sender === model.name) {
    button("🗑", "Delete", () => { if (confirm("Delete this message for everyone?")) model.act("DELETE", msg.id); });
  }
  return box;
}

/** The box's next Enter replies to `msg`, or (EDIT) changes it; null: a plain message again. */
function compose(verb, msg) {
  composing = verb ? { verb, msg } : null;
  const bar = $("composing");
  bar.hidden = !composing;
  if (composing) {
    $("composing-text").textContent = verb === "REPLY" ? `Replying to ${msg.sender}: ${msg.text.split("\n")[0].slice(0, 80)}`
      : "Editing your message (Escape: cancel)";
    if (verb === "EDIT") $("input").value = msg.text;
    resizeInput();
    $("input").focus();
  }
}

function noticeRow(notice) {
  const row = document.createElement("div");
  row.className = "notice" + (notice.error ? " error" : "");
  row.textContent = notice.text;
  return row;
}

/** The active conversation's messages: `bottom` scrolls to the newest, `append` follows them if the
 * reader was at the bottom, `keep` keeps the reader where they were (older messages came above). */
function drawMessages(mode) {
  const box = $("messages");
  const conv = model.conversation(model.active);
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  // the first message in view stays where it is when others come above or below it
  const anchor = [...box.querySelectorAll(".msg")].find((r) => r.offsetTop + r.offsetHeight > box.scrollTop);
  const anchorId = anchor ? anchor.dataset.id : null;
  const offset = anchor ? anchor.offsetTop - box.scrollTop : 0;
  const shown = notices.get(conv.key) || [];
  const rows = [];
  if (!conv.hasOlder && conv.messages.length) {
    const start = document.createElement("div");
    start.className = "notice start";
    start.textContent = conv.kind === "room" ? `the start of #${conv.name}` : `the start of your messages with ${conv.name}`;
    rows.push(start);
  }
  let n = 0;
  let previous = null;
  for (const msg of conv.messages) {
    while (n < shown.length && shown[n].after < msg.id) {
      rows.push(noticeRow(shown[n++]));
      previous = null;
    }
    const row = messageRow(msg);
    // a run of one person's lines shows the name once (a new run after GROUP_SECONDS, or an action)
    if (previous && previous.sender === msg.sender && previous.kind === "msg" && msg.kind === "msg" &&
        msg.ts - previous.ts < GROUP_SECONDS) row.classList.add("more");
    rows.push(row);
    previous = msg;
  }
  while (n < shown.length) rows.push(noticeRow(shown[n++]));
  box.replaceChildren(...rows);
  if (mode === "bottom" || atBottom || !anchorId) box.scrollTop = box.scrollHeight;
  else if (mode === "keep") {
    const row = box.querySelector(`[data-id="${anchorId}"]`);
    if (row) box.scrollTop = row.offsetTop - offset;
  }
  if (box.scrollHeight <= box.clientHeight) model.loadOlder(conv.key);
}

function addNotice({ key, text, error = false, quiet = false, unsent = "" }) {
  if (error && !$("settings").hidden) $("protect-result").textContent = text;  // (a refused /register)
  if (quiet && key !== model.active) return;
  const conv = model.conversation(key);
  const list = notices.get(key) || [];
  list.push({ after: conv.lastId, text, error });
  if (list.length > 200) list.shift();
  notices.set(key, list);
  if (key === model.active) drawMessages("append");
  if (unsent && !$("input").value) $("input").value = unsent;  // not sent: the text is not lost
}

function highlight(id) {
  const row = $("messages").querySelector(`[data-id="${Number(id)}"]`);
  if (row) row.scrollIntoView({ block: "center" });
}

let bannerTimer = null;

function drawStatus() {
  const banner = $("banner");
  const text = $("banner-text");
  const button = $("banner-button");
  clearInterval(bannerTimer);
  $("status-dot").className = "dot " + model.state;
  if (model.state === "online") {
    banner.hidden = true;
    return;
  }
  banner.hidden = false;
  button.hidden = false;
  if (model.state === "ended") {
    if (model.refused === "too-many-devices") {  // (the login is good: another device may log out)
      text.textContent = model.ended;
      button.textContent = "Try again";
      button.onclick = () => model.reconnect();
      return;
    }
    if (model.refused) {  // the name is someone else's now, or needs its (new) password
      showLogin(model.ended, model.refused === "name-taken" ? "" : model.name);
      return;
    }
    if (model.ended.startsWith("logged out")) {
      showLogin(`You were ${model.ended}.`);
      return;
    }
    text.textContent = "This chat is open in another tab or window.";
    button.textContent = "Use it here";
    button.onclick = () => model.reconnect();
    return;
  }
  if (model.state === "connecting") {
    text.textContent = model.everOnline ? "Reconnecting…" : "Connecting…";
    button.hidden = true;
    return;
  }
  const tick = () => {
    const left = Math.max(0, Math.ceil((model.retryAt - Date.now()) / 1000));
    text.textContent = `Offline: the server cannot be reached. Trying again in ${left} s.`;
  };
  tick();
  bannerTimer = setInterval(tick, 1000);
  button.textContent = "Try now";
  button.onclick = () => model.reconnect();
}

/** Before each reconnect: is this browser still logged in?  (A revoked session goes to the login.) */
async function retry() {
  if (!model || model.socket) return;
  try {
    const answer = await api("/api/session");
    if (answer.ok && !answer.data.name) {
      model.close();
      showLogin("You were logged out; log in again.");
      return;
    }
  } catch {
    // the server is not answering HTTP either: the WebSocket's attempt fails and waits again
  }
  if (model.state !== "ended") model.connect();
}

// --- switching, sending, commands ------------------------------------------------------------------

/** On a narrow screen, the conversations and the members are drawers over the chat. */
function closeDrawers() {
  document.body.classList.remove("sidebar-open");
  if (NARROW.matches) {
    $("members").hidden = true;
    document.body.classList.remove("members-open");
  }
  $("scrim").hidden = true;
}

function switchTo(key) {
  model.open(key);
  closeOverlays();
  closeDrawers();
  drawAll();
  $("input").focus();
}

function openDm(name) {
  if (name === model.name) return;
  const conv = model.conversation("@" + name);
  conv.joined = true;
  if (!conv.loaded) {
    conv.loaded = true;
    conv.hasOlder = conv.messages.length > 0;
  }
  switchTo(conv.key);
}

function roomName(word) {
  const name = word.replace(/^#/, "").toLowerCase();
  return ROOM.test(name) ? name : null;
}

function joinRooms(words, privately = false) {
  const names = words.map(roomName);
  if (!names.length || names.includes(null)) {
    addNotice({ key: model.active, text: "room names are # and 1-30 of a-z, 0-9, '_' or '-'", error: true });
    return;
  }
  const known = model.conversations.get("#" + names[0]);
  if (known && known.joined) switchTo(known.key);
  else model.pendingSwitch = names[0];
  $("input").focus();
  model.send("JOIN", ...names.map((n) => "#" + n), ...(privately ? ["+i"] : []));
}

async function command(line) {
  const [word, ...rest] = line.split(" ");
  const args = rest.filter((w) => w);
  const text = line.slice(word.length + 1);
  const conv = model.conversation(model.active);
  switch (word.toLowerCase()) {
    case "/join":
    case "/j":
      joinRooms(args.filter((a) => a !== "--private"), args.includes("--private"));
      break;
    case "/part":
    case "/leave": {
      const forget = args.includes("--forget");
      const words = args.filter((a) => a !== "--forget");
      const room = words[0] && words[0].startsWith("#") ? roomName(words[0]) : conv.kind === "room" ? conv.name : null;
      const reason = words[0] && words[0].startsWith("#") ? words.slice(1).join(" ") : words.join(" ");
      if (!room || room === MAIN) {
        addNotice({ key: conv.key, text: "#main is where everyone is; it cannot be left", error: true });
      } else if (forget) {
        model.send("FORGET", "#" + room);
      } else {
        model.send("PART", "#" + room, ...(reason ? [reason] : []));
      }
      break;
    }
    case "/invite":
    case "/kick":
    case "/ban":
    case "/unban":
    case "/mute":
    case "/unmute":
    case "/op":
    case "/deop":
    case "/mode":
      moderate(word.toLowerCase().slice(1), args, conv);
      break;
    case "/msg":
    case "/query": {
      const name = args[0];
      if (!name || !NAME.test(name)) {
        addNotice({ key: conv.key, text: COMMANDS["/msg"], error: true });
        break;
      }
      const message = text.slice(name.length).trim();
      openDm(name);
      if (message) model.say("@" + name, message);
      break;
    }
    case "/me":
      if (text.trim()) model.say(conv.key, text.trim(), "me");
      break;
    case "/topic":
      if (conv.kind !== "room") break;
      if (text.trim()) model.send("TOPIC", conv.key, text.trim());
      else addNotice({ key: conv.key, text: conv.topic ? `topic: ${conv.topic}` : "no topic is set" });
      break;
    case "/names":
      if (conv.kind === "room") {
        addNotice({ key: conv.key, text: `in #${conv.name}: ${[...conv.members.keys()].sort().join(", ")}` });
      }
      break;
    case "/who":
      model.send("DIR");
      break;
    case "/rooms":
      openSwitcher();  // every room, with the ones joined first
      break;
    case "/search":
      if (text.trim()) {  // everywhere, as the ⌕ button; "only this conversation" narrows it
        $("search-input").value = text.trim();
        $("search-here").checked = false;
        openSearch(true);
      } else {
        openSearch(false);
      }
      break;
    case "/nick":
      await rename(args[0] || "");
      break;
    case "/register":
      openSettings("protect");
      break;
    case "/logout":
      if (args[0] === "--others") openSettings("others");
      else await logOut();
      break;
    case "/re":
    case "/react":
    case "/edit":
    case "/delete": {
      const id = Number((args[0] || "").replace(/^#/, ""));
      const rest = text.slice((args[0] || "").length).trim();
      const verb = { "/re": "REPLY", "/react": "REACT", "/edit": "EDIT", "/delete": "DELETE" }[word.toLowerCase()];
      if (!Number.isInteger(id) || id <= 0 || (verb === "DELETE") === Boolean(rest)) {
        addNotice({ key: conv.key, text: COMMANDS[word.toLowerCase()], error: true });
      } else {
        model.act(verb, id, rest);
      }
      break;
    }
    case "/help":
      addNotice({ key: conv.key, text: "commands: " + Object.values(COMMANDS).join(" · ") +
        " · keys: Enter sends, Shift-Enter a new line, Tab completes, Alt-1..9 and Ctrl-K switch" });
      break;
    default:
      addNotice({ key: conv.key, text: `unknown command ${word}: /help lists them`, error: true });
  }
}

/** /invite /kick /ban /unban /mute /unmute /op /deop /mode, in the room on screen. */
function moderate(action, args, conv) {
  if (conv.kind !== "room") {
    addNotice({ key: conv.key, text: `/${action} works in rooms`, error: true });
    return;
  }
  if (action !== "mode" && !args.length) {
    addNotice({ key: conv.key, text: COMMANDS["/" + action], error: true });
    return;
  }
  const where = conv.key;
  if (action === "mode") model.send("MODE", where, ...args.slice(0, 1));
  else if (action === "kick") model.send("KICK", where, args[0], ...(args.length > 1 ? [args.slice(1).join(" ")] : []));
  else if (action === "invite") model.send("INVITE", where, args[0]);
  else if (action === "ban") {
    const timed = args.length > 1 && /^(\d+[smhdw]?|forever)$/.test(args[1]);
    model.send("MODE", where, "+b", args[0], timed ? args[1] : "", args.slice(timed ? 2 : 1).join(" "));
  } else if (action === "unban") model.send("MODE", where, "-b", args[0]);
  else if (action === "mute") model.send("MUTE", where, args[0], ...(args[1] ? [args[1]] : []));
  else if (action === "unmute") model.send("UNMUTE", where, args[0]);
  else model.send("MODE", where, action === "op" ? "+o" : "-o", args[0]);
}

async function rename(name) {
  if (!NAME.test(name)) {
    addNotice({ key: model.active, text: COMMANDS["/nick"], error: true });
    return;
  }
  const answer = await api("/api/login", { name });
  if (!answer.ok) {
    addNotice({ key: model.active, text: answer.data.message || "that name cannot be used", error: true });
    return;
  }
  startChat(answer.data.name, answer.data.protected);
}

async function logOut() {
  model.close();
  try {
    await api("/api/logout", {});
  } finally {
    showLogin("You logged out.");
  }
}

function submit(event) {
  if (event) event.preventDefault();
  const input = $("input");
  const text = input.value;
  if (!text.trim()) return;
  if (model.state !== "online") {
    addNotice({ key: model.active, text: "offline: the message stays in the box until the chat is back", error: true });
    return;
  }
  input.value = "";
  resizeInput();
  hideSuggestions();
  if (composing) {
    const { verb, msg } = composing;
    compose(null);
    model.act(verb, msg.id, text);
  } else if (text.startsWith("/") && !text.startsWith("//")) {
    command(text.trim());
  } else {
    model.say(model.active, text.startsWith("//") ? text.slice(1) : text);
  }
}

// --- completion: Tab, and @ names as you type ------------------------------------------------------------

let completion = null;  // {start, end, options, index} while Tab cycles

function currentWord() {
  const input = $("input");
  const end = input.selectionStart;
  const start = input.value.slice(0, end).search(/\S*$/);
  return { start, end, word: input.value.slice(start, end) };
}

function candidates(word, start) {
  const lower = word.toLowerCase();
  const conv = model.conversation(model.active);
  if (word.startsWith("/") && start === 0) return Object.keys(COMMANDS).filter((c) => c.startsWith(lower));
  if (word.startsWith("#")) {
    const rooms = new Set([...model.conversations.values()].filter((c) => c.kind === "room").map((c) => c.name)
      .concat(model.rooms.map((r) => r.name)));
    return [...rooms].sort().map((r) => "#" + r).filter((r) => r.startsWith(lower));
  }
  const bare = word.replace(/^@/, "").toLowerCase();
  const names = new Set([...conv.members.keys(), ...model.conversation("#" + MAIN).members.keys()]);
  names.delete(model.name);
  return [...names].sort().filter((n) => n.toLowerCase().startsWith(bare))
    .map((n) => (word.startsWith("@") ? "@" + n : start === 0 ? n + ":" : n));
}

function complete() {
  const input = $("input");
  if (!completion) {
    const { start, end, word } = currentWord();
    if (!word) return false;
    const options = candidates(word, start);
    if (!options.length) return false;
    completion = { start, end, options, index: 0 };
  } else {
    completion.index = (completion.index + 1) % completion.options.length;
  }
  const choice = completion.options[completion.index] + " ";
  input.value = input.value.slice(0, completion.start) + choice + input.value.slice(completion.end);
  completion.end = completion.start + choice.length;
  input.selectionStart = input.selectionEnd = completion.end;
  showSuggestions(completion.options, completion.index);
  return true;
}

function showSuggestions(options, selected = -1) {
  const list = $("suggestions");
  list.replaceChildren(...options.slice(0, 8).map((option, i) => {
    const item = document.createElement("li");
    item.textContent = option;
    if (i === selected) item.className = "selected";
    item.addEventListener("mousedown", (e) => {
      e.preventDefault();
      const { start, end } = currentWord();
      const input = $("input");
      input.value = input.value.slice(0, start) + option + " " + input.value.slice(end);
      input.selectionStart = input.selectionEnd = start + option.length + 1;
      hideSuggestions();
      input.focus();
    });
    return item;
  }));
  list.hidden = !options.length;
}

function hideSuggestions() {
  $("suggestions").hidden = true;
}

function suggestAsYouType() {
  completion = null;
  const { word, start } = currentWord();
  if (word.length >= 2 && (word.startsWith("@") || word.startsWith("#"))) showSuggestions(candidates(word, start));
  else hideSuggestions();
}

function resizeInput() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 200) + "px";
}

// --- overlays: the switcher, search, settings ------------------------------------------------------------

function closeOverlays() {
  for (const id of ["switcher", "search", "settings"]) $(id).hidden = true;
}

function openSwitcher() {
  closeOverlays();
  $("switcher").hidden = false;
  $("switcher-input").value = "";
  drawSwitcher();
  $("switcher-input").focus();
  model.send("ROOMS");
}

function switcherOptions() {
  const filter = $("switcher-input").value.trim().toLowerCase();
  const options = model.ordered().map((c) => ({ key: c.key, label: c.kind === "room" ? "#" + c.name : c.name,
    hint: c.unread ? `${c.unread} unread` : "" }));
  for (const room of model.rooms) {
    if (!options.some((o) => o.key === "#" + room.name)) {
      options.push({ key: "#" + room.name, label: "#" + room.name, hint: `join · ${room.online} online`, join: true });
    }
  }
  let found = options.filter((o) => o.label.toLowerCase().includes(filter.replace(/^@/, "")));
  const typed = roomName(filter);
  if (filter.startsWith("#") && typed && !found.some((o) => o.key === "#" + typed)) {
    found = [{ key: "#" + typed, label: "#" + typed, hint: "join (a new room)", join: true }, ...found];
  }
  return found;
}

let switcherIndex = 0;

function drawSwitcher() {
  const list = $("switcher-list");
  const options = switcherOptions();
  switcherIndex = Math.min(switcherIndex, Math.max(0, options.length - 1));
  list.replaceChildren(...options.map((option, i) => {
    const item = document.createElement("li");
    item.className = i === switcherIndex ? "selected" : "";
    const label = document.createElement("span");
    label.textContent = option.label;
    const hint = document.createElement("span");
    hint.className = "hint";
    hint.textContent = option.hint;
    item.append(label, hint);
    item.addEventListener("click", () => pick(option));
    return item;
  }));
}

function pick(option) {
  closeOverlays();
  if (option.join) joinRooms([option.key]);
  else switchTo(option.key);
}

function openSearch(run) {
  closeOverlays();
  $("search").hidden = false;
  $("search-input").focus();
  if (run) runSearch();
}

function runSearch(event) {
  if (event) event.preventDefault();
  const words = $("search-input").value.trim();
  if (!words) return;
  const here = $("search-here").checked && model.active.startsWith("#") ? model.active : null;
  $("search-summary").textContent = "searching…";
  model.search(words, here);
}

function drawSearch() {
  const results = model.searchResults;
  const where = results.key ? `in ${results.key}` : "in #main, your direct messages and every room you are in";
  $("search-summary").textContent = `${results.messages.length} message${results.messages.length === 1 ? "" : "s"} ` +
    `with “${results.words}” ${where}, newest first`;
  $("search-results").replaceChildren(...results.messages.map((msg) => {
    const item = document.createElement("li");
    const where = document.createElement("span");
    where.className = "hint";
    const key = model.keyOf(msg);
    where.textContent = key[0] === "#" ? key : `direct messages with ${key.slice(1)}`;
    const row = messageRow(msg);
    item.append(where, row);
    item.addEventListener("click", () => {
      closeOverlays();
      if (key[0] === "@") model.conversation(key).joined = true;
      model.jump(key, msg.id);
    });
    return item;
  }));
}

function openSettings(part = "") {
  closeOverlays();
  $("settings").hidden = false;
  $("notify-toggle").checked = localStorage.getItem("chatctl.notify") === "on";
  drawNotifyState();
  $("logout-others-result").textContent = "";
  $("protect-result").textContent = "";
  $("logout-others-form").hidden = !model.protected;  // (a free name has no password, and no other devices)
  $("protect-form").hidden = model.protected;
  const focus = { others: "logout-others-password", protect: "protect-password" }[part] || "settings-close";
  $(model.protected && part === "protect" ? "settings-close" : focus).focus();
  if (model.protected && part === "protect") {
    addNotice({ key: model.active, text: "your name is protected already (its password changes with chatctl register)" });
  }
}

function protectName(event) {
  event.preventDefault();
  const password = $("protect-password").value;
  if (password !== $("protect-again").value) {
    $("protect-result").textContent = "The two passwords differ.";
  } else if ([...password].length < 8) {
    $("protect-result").textContent = "A password has 8 characters or more.";
  } else if (model.send("REGISTER", password)) {
    $("protect-result").textContent = "Protecting…";
    $("protect-password").value = $("protect-again").value = "";
  } else {
    $("protect-result").textContent = "Offline: try again once the chat is back.";
  }
}

function drawNotifyState() {
  const state = !("Notification" in window) ? "This browser has no notifications." :
    Notification.permission === "denied" ? "Notifications are blocked for this site in the browser's settings." : "";
  $("notify-state").textContent = state;
}

async function toggleNotify() {
  const on = $("notify-toggle").checked;
  localStorage.setItem("chatctl.notify", on ? "on" : "off");
  if (on && "Notification" in window && Notification.permission === "default") await Notification.requestPermission();
  drawNotifyState();
}

async function logOutOthers(event) {
  event.preventDefault();
  const password = $("logout-others-password").value;
  const answer = await api("/api/logout", { others: true, password });
  $("logout-others-password").value = "";
  $("logout-others-result").textContent = answer.ok ? `Logged out ${answer.data.ended} other device(s) and every other browser.`
    : answer.data.message || `The server said ${answer.status}.`;
}

function notify({ key, message, mention }) {
  if (!mention || !document.hidden || localStorage.getItem("chatctl.notify") !== "on") return;
  if (!("Notification" in window) || Notification.permission !== "granted") return;
  const where = key[0] === "#" ? ` in ${key}` : "";
  const note = new Notification(`${message.sender}${where}`, { body: message.text.slice(0, 200), tag: key });
  note.onclick = () => {
    window.focus();
    switchTo(key);
  };
}

// --- wiring -------------------------------------------------------------------------------------------------

function keydown(event) {
  if (!model || $("chat").hidden) return;
  if (event.altKey && /^Digit[1-9]$/.test(event.code)) {
    const conv = model.ordered()[Number(event.code.slice(5)) - 1];
    if (conv) switchTo(conv.key);
    event.preventDefault();
  } else if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "k") {
    event.preventDefault();
    openSwitcher();
  } else if (event.key === "Escape") {
    if (composing) {
      if (composing.verb === "EDIT") $("input").value = "";
      compose(null);
    }
    closeOverlays();
    hideSuggestions();
    closeDrawers();
    $("input").focus();
  }
}

function inputKeydown(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    submit(event);
  } else if (event.key === "ArrowUp" && !$("input").value && model.lastOwn(model.active)) {
    event.preventDefault();  // Up on an empty box: edit our last message here
    compose("EDIT", model.lastOwn(model.active));
  } else if (event.key === "Tab" && !event.shiftKey) {
    if (complete()) event.preventDefault();
  } else if (!["Shift", "Control", "Alt", "Meta"].includes(event.key)) {
    completion = null;
  }
}

function switcherKeydown(event) {
  const options = switcherOptions();
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    switcherIndex = (switcherIndex + (event.key === "ArrowDown" ? 1 : -1) + options.length) % Math.max(1, options.length);
    drawSwitcher();
    event.preventDefault();
  } else if (event.key === "Enter") {
    event.preventDefault();
    if (options[switcherIndex]) pick(options[switcherIndex]);
  }
}

function wire() {
  $("login-form").addEventListener("submit", logIn);
  $("composer").addEventListener("submit", submit);
  $("input").addEventListener("keydown", inputKeydown);
  $("input").addEventListener("input", () => { resizeInput(); suggestAsYouType(); });
  $("input").addEventListener("blur", () => setTimeout(hideSuggestions, 150));
  document.addEventListener("keydown", keydown);
  $("messages").addEventListener("scroll", () => {
    if (model && $("messages").scrollTop < 80) model.loadOlder(model.active);
  });
  $("join-button").addEventListener("click", openSwitcher);
  $("switcher-input").addEventListener("input", () => { switcherIndex = 0; drawSwitcher(); });
  $("switcher-input").addEventListener("keydown", switcherKeydown);
  $("search-button").addEventListener("click", () => openSearch(false));
  $("search-form").addEventListener("submit", runSearch);
  $("search-here").addEventListener("change", () => runSearch());
  $("members-close").addEventListener("click", closeDrawers);
  $("settings-button").addEventListener("click", () => openSettings());
  $("settings-close").addEventListener("click", closeOverlays);
  $("notify-toggle").addEventListener("change", toggleNotify);
  $("logout-button").addEventListener("click", logOut);
  $("logout-others-form").addEventListener("submit", logOutOthers);
  $("protect-form").addEventListener("submit", protectName);
  $("latest-button").addEventListener("click", () => model.latest(model.active));
  $("composing-cancel").addEventListener("click", () => {
    if (composing && composing.verb === "EDIT") $("input").value = "";
    compose(null);
  });
  $("members-button").addEventListener("click", () => {
    $("members").hidden = !$("members").hidden;
    document.body.classList.toggle("members-open", !$("members").hidden);
    if (NARROW.matches) $("scrim").hidden = $("members").hidden;  // a drawer over the chat: a tap outside closes it
  });
  $("menu-button").addEventListener("click", () => {
    document.body.classList.toggle("sidebar-open");
    $("scrim").hidden = !document.body.classList.contains("sidebar-open");
  });
  $("scrim").addEventListener("click", closeDrawers);
  for (const overlay of document.querySelectorAll(".overlay")) {
    overlay.addEventListener("click", (e) => { if (e.target === overlay) closeOverlays(); });
  }
  document.addEventListener("visibilitychange", () => {
    if (!model) return;
    model.visible = !document.hidden;
    if (model.visible) model.markRead(model.active);
  });
  if (window.matchMedia("(min-width: 1000px)").matches) {
    $("members").hidden = false;
    document.body.classList.add("members-open");
  }
}

async function boot() {
  wire();
  try {  // the server says who this browser is in the page itself (one round trip less), else asked
    sessionInfo = JSON.parse(document.querySelector('meta[name="chatctl-session"]').content);
  } catch {
    try {
      sessionInfo = (await api("/api/session")).data;
    } catch {
      sessionInfo = null;
    }
  }
  if (sessionInfo && sessionInfo.name) startChat(sessionInfo.name, sessionInfo.protected);
  else showLogin(sessionInfo ? "" : "The server cannot be reached; reload in a moment.");
}

boot();
