// The chat as the browser knows it, with no page in it: conversations (rooms and direct messages),
// their messages, members, topics, unread counts and read markers, and the link to the server (one
// WebSocket speaking chatctl/1 requests out, the server's events as JSON in).  app.js draws it.

import { escapeText, mentions } from "./text.js";

export const MAIN = "main";
const PAGE = 50;             // messages asked for at a time
const GAP_PAGE = 200;        // ... when filling the gap after a reconnect
const KEEP = 2000;           // messages kept per conversation (older ones are asked for again)
const SEND_ERRORS = new Set(["rate-limited", "storage-failed", "empty-message", "unknown-user",
  "not-in-room", "bus-unavailable", "frame-too-long", "unknown-room", "invalid-room", "not-registered",
  "unknown-message", "not-author", "too-late", "message-deleted", "too-many-reactions", "history-off", "muted"]);
export const ACTIONS = new Set(["edit", "delete", "react", "unreact"]);  // kinds that change an earlier message
const HISTORY_ERRORS = new Set(["history-off", "history-failed"]);
const BACKOFF = [1, 2, 4, 8, 15, 30];  // seconds between reconnects
const FINAL = ["taken over", "logged out"];  // a Goodbye after which this tab does not reconnect by itself
const REFUSALS = new Set(["name-taken", "name-protected", "too-many-devices", "bad-password", "banned"]);

const MODE_WORDS = { i: "private (invite-only)", t: "topic locked", m: "moderated" };

export function describeModes(modes) {
  const words = [...modes].filter((c) => MODE_WORDS[c]).map((c) => MODE_WORDS[c]);
  return words.length ? words.join(", ") : "public, anyone may set the topic";
}

/** A moderation event as one line: what was done, by whom, why. */
export function moderationText(e, me) {
  const target = e.target === me ? "you" : e.target;
  const room = "#" + e.room;
  const until = e.until ? ` until ${new Date(e.until * 1000).toLocaleString()}` : "";
  const why = e.reason ? `: ${e.reason}` : "";
  const said = {
    kick: `${e.by} removed ${target} from ${room}${why}`,
    ban: `${e.by} banned ${target} from ${room}${until}${why}`,
    unban: `${e.by} lifted the ban on ${target} in ${room}`,
    mute: `${e.by} muted ${target} in ${room}${until}`,
    unmute: `${e.by} let ${target} speak again in ${room}`,
    op: `${e.by} made ${target} an operator of ${room}`,
    deop: e.by === e.target ? `${e.by} stepped down as an operator of ${room}` : `${e.by} took ${room}'s operator rights from ${target}`,
    voice: `${e.by} gave ${target} a voice in ${room}`,
    devoice: `${e.by} took ${target}'s voice in ${room}`,
    invite: `${e.by} invited ${target} to ${room}` + (target === "you" ? ` (/join ${room})` : ""),
    forget: `${target} left ${room} for good`,
    mode: `${e.by} set ${room} ${e.target}: ` + [...e.target.slice(1)].filter((c) => MODE_WORDS[c])
      .map((c) => (e.target[0] === "+" ? "" : "not ") + MODE_WORDS[c]).join(", "),
  };
  return said[e.action] || `${e.by} ${e.action} ${target} in ${room}${why}`;
}

export class Conversation {
  constructor(key) {
    this.key = key;                    // "#room" or "@name"
    this.kind = key[0] === "#" ? "room" : "dm";
    this.name = key.slice(1);
    this.messages = [];                // oldest first, no two with one id
    this.unread = 0;
    this.mentions = 0;
    this.marker = 0;                   // read up to this id (this account's, on every device)
    this.known = false;                // the marker is one this browser kept (history after it is unread)
    this.topic = "";
    this.members = new Map();          // name -> {bot, devices}
    this.joined = this.kind === "dm";
    this.hasOlder = true;              // the server may have older messages
    this.loaded = false;               // its newest page was asked for
    this.detached = false;             // showing a search hit's surroundings, not the newest messages
  }

  get lastId() {
    return this.messages.length ? this.messages[this.messages.length - 1].id : 0;
  }

  /** Add messages (any order, any overlap): true if any was new. */
  add(messages) {
    let added = false;
    const ids = new Set(this.messages.map((m) => m.id));
    for (const m of messages) {
      if (!ids.has(m.id)) {
        ids.add(m.id);
        this.messages.push(m);
        added = true;
      }
    }
    if (added) {
      this.messages.sort((a, b) => a.id - b.id);
      if (this.messages.length > KEEP) {
        this.messages.splice(0, this.messages.length - KEEP);
        this.hasOlder = true;
      }
    }
    return added;
  }
}

export class ChatModel extends EventTarget {
  constructor() {
    super();
    this.name = "";
    this.protected = false;            // a protected name: the server keeps its rooms' read markers
    this.conversations = new Map();    // key -> Conversation, in the order they came
    this.rooms = [];                   // the server's rooms (RoomInfo), for the switcher
    this.active = "#" + MAIN;
    this.state = "offline";            // offline, connecting, online, ended
    this.ended = "";                   // why the server ended this tab for good (taken over, logged out)
    this.lastId = 0;                   // the newest message id seen in any conversation
    this.visible = true;               // the page is on screen (read markers move only then)
    this.sends = [];                   // our messages sent, waiting for their MSG_OK
    this.histories = [];               // HISTORY and SEARCH asked, waiting for their page
    this.searchResults = null;         // {words, key, messages, waiting, seq}: the last search's answers
    this.pendingSwitch = null;         // a room /join asked for: shown once it is joined
    this.refused = "";                 // the code the server refused this tab's name with (name-taken...)
    this.socket = null;
    this.retries = 0;
    this.retryAt = 0;
    this.timer = null;
    this.everOnline = false;
    this.conversation("#" + MAIN);
  }

  // --- what the page reads ---------------------------------------------------------------------

  conversation(key) {
    let conv = this.conversations.get(key);
    if (!conv) {
      conv = new Conversation(key);
      this.recallMarker(conv);
      this.conversations.set(key, conv);
    }
    return conv;
  }

  /** The conversations in the sidebar's order: #main, the other rooms joined by name, then DMs. */
  ordered() {
    const all = [...this.conversations.values()].filter((c) => c.joined);
    const rooms = all.filter((c) => c.kind === "room").sort((a, b) =>
      (a.name === MAIN ? -1 : b.name === MAIN ? 1 : a.name.localeCompare(b.name)));
    const dms = all.filter((c) => c.kind === "dm").sort((a, b) => a.name.localeCompare(b.name));
    return [...rooms, ...dms];
  }

  get totalUnread() {
    return this.ordered().reduce((sum, c) => sum + c.unread, 0);
  }

  get totalMentions() {
    return this.ordered().reduce((sum, c) => sum + c.mentions + (c.kind === "dm" ? c.unread : 0), 0);
  }

  changed(what, detail = {}) {
    this.dispatchEvent(new CustomEvent(what, { detail }));
  }

  // --- the link ---------------------------------------------------------------------------------

  connect() {
    if (this.socket || this.state === "ended") return;
    clearTimeout(this.timer);
    this.state = "connecting";
    this.changed("status");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/ws`);
    this.socket = socket;
    socket.onmessage = (e) => {
      let event;
      try {
        event = JSON.parse(e.data);
      } catch {
        return;
      }
      this.handle(event);
    };
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.sends.length) {  // sent, not confirmed: stored or not, the gap fill will tell
        this.changed("notice", { key: this.sends[0].key, error: true, text: `the link dropped before the server ` +
          `confirmed ${this.sends.length} message(s): they show here once back if they arrived` });
      }
      this.sends = [];
      this.histories = [];
      if (this.state === "ended") {
        this.changed("status");
        return;
      }
      this.state = "offline";
      const wait = BACKOFF[Math.min(this.retries, BACKOFF.length - 1)] * (0.8 + Math.random() * 0.4);
      this.retries += 1;
      this.retryAt = Date.now() + wait * 1000;
      this.timer = setTimeout(() => this.changed("retry"), wait * 1000);
      this.changed("status");
    };
  }

  /** Reconnect now (the banner's button, or a tab taken over that is to be used here again). */
  reconnect() {
    if (this.state === "ended") this.ended = this.refused = "";
    this.state = "offline";
    this.retries = 0;
    clearTimeout(this.timer);
    this.changed("retry");
  }

  close() {
    this.state = "ended";
    if (this.socket) this.socket.close(1000);
  }

  send(...fields) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return false;
    this.socket.send(fields.join("|"));
    return true;
  }

  // --- requests ---------------------------------------------------------------------------------

  say(key, text, kind = "msg") {
    const conv = this.conversation(key);
    const escaped = escapeText(text);
    if (conv.kind === "dm") {
      if (this.send("DM", conv.name, escaped)) {
        this.sends.push({ key, text, kind: "dm", recipient: conv.name, room: MAIN });
      }
    } else if (this.send(kind === "me" ? "ME" : "MSG", key, escaped)) {
      this.sends.push({ key, text, kind, recipient: null, room: conv.name });
    }
  }

  /** REPLY, EDIT, DELETE or REACT on message `id`: where that message is (a reply goes there too). */
  act(verb, id, text = "") {
    const target = this.find(id);
    const key = target ? this.keyOf(target) : this.active;
    const conv = this.conversation(key);
    const fields = verb === "DELETE" ? [id] : [id, verb === "REACT" ? text : escapeText(text)];
    if (this.send(verb, ...fields)) {
      this.sends.push({ key, text, kind: verb.toLowerCase(), ref: id,
        recipient: conv.kind === "dm" ? conv.name : null, room: conv.kind === "dm" ? MAIN : conv.name });
    }
  }

  /** A message this tab has, by id, as it is now (null: not here). */
  find(id) {
    for (const conv of this.conversations.values()) {
      const msg = conv.messages.find((m) => m.id === id);
      if (msg) return msg;
    }
    return null;
  }

  /** Our last message in a conversation that is still there (what Up edits). */
  lastOwn(key) {
    const messages = this.conversation(key).messages;
    for (let i = messages.length - 1; i >= 0; i--) {
      if (messages[i].sender === this.name && !messages[i].deleted && messages[i].kind !== "me") return messages[i];
    }
    return null;
  }

  history(key, mode, anchor = 0, count = PAGE) {
    const conv = key ? this.conversation(key) : null;
    const room = conv && conv.kind === "room" ? [key] : [];
    const args = mode === "last" ? ["LAST", count] : [mode.toUpperCase(), anchor, count];
    if (this.send("HISTORY", ...room, ...args)) this.histories.push({ key, mode, count });
  }

  loadOlder(key) {
    const conv = this.conversation(key);
    if (!conv.hasOlder || conv.loadingOlder) return;
    const oldest = conv.messages.length ? conv.messages[0].id : 0;
    if (!oldest) return;
    conv.loadingOlder = true;
    this.history(conv.kind === "room" ? key : null, "before", oldest, PAGE);
    this.histories[this.histories.length - 1].older = key;
  }

  /** Search one conversation (`key`), or everywhere: #main and the direct messages in one request, and
   * each room joined in one of its own; the answers are merged, newest first. */
  search(words, key = null) {
    const where = key && key[0] === "#" ? [[key]] : [[], ...this.ordered()
      .filter((c) => c.kind === "room" && c.name !== MAIN).map((c) => [c.key])];
    this.searchSeq = (this.searchSeq || 0) + 1;
    this.searchResults = { words, key: where.length === 1 && where[0].length ? key : null, messages: [], waiting: 0,
      seq: this.searchSeq };
    for (const room of where) {
      if (this.send("SEARCH", ...room, PAGE, words)) {
        this.histories.push({ key, mode: "search", words, seq: this.searchSeq });
        this.searchResults.waiting += 1;
      }
    }
  }

  /** Show the messages around `id` in `key` (a search hit): they replace what the conversation shows. */
  jump(key, id) {
    const conv = this.conversation(key);
    this.active = key;
    if (conv.messages.some((m) => m.id === id)) {
      this.changed("jump", { key, id });
      return;
    }
    conv.messages = [];
    conv.detached = true;
    conv.hasOlder = true;
    const room = conv.kind === "room" ? key : null;
    this.history(room, "before", id + 1, PAGE);
    this.histories[this.histories.length - 1].jump = id;
    this.history(room, "after", id, PAGE);
    this.changed("conversations");
  }

  /** Back to the newest messages of a conversation that shows a search hit. */
  latest(key) {
    const conv = this.conversation(key);
    conv.messages = [];
    conv.detached = false;
    conv.hasOlder = true;
    this.history(conv.kind === "room" ? key : null, "last", 0, PAGE);
    this.changed("conversations");
  }

  open(key) {
    const conv = this.conversation(key);
    this.active = key;
    this.store("active", key);
    if (!conv.loaded && conv.kind === "room") {
      conv.loaded = true;
      this.history(key, "last");
    }
    this.markRead(key);
    this.changed("conversations");
  }

  /** Everything shown in `key` is read (on this account's other devices too). */
  markRead(key) {
    const conv = this.conversation(key);
    const last = conv.detached ? 0 : conv.lastId;
    if (conv.unread || conv.mentions) {
      conv.unread = conv.mentions = 0;
      this.changed("conversations");
    }
    if (last > conv.marker && this.visible) {
      conv.marker = last;
      this.send("MARK", conv.kind === "room" ? key : "@" + conv.name, last);
      this.storeMarker(key, last);
    }
  }

  // --- events from the server ---------------------------------------------------------------------

  handle(event) {
    const handler = this["on" + event.type];
    if (handler) handler.call(this, event);
  }

  onWelcome() {}

  onRegistered() {
    this.state = "online";
    this.retries = 0;
    const again = this.everOnline;
    this.everOnline = true;
    const remembered = this.rememberedRooms().filter((r) => r !== MAIN);
    // joined first, so that the ROOMS answer counts their unread lines as the account's
    if (remembered.length) this.send("JOIN", ...remembered.map((r) => "#" + r));
    this.send("ROOMS");
    if (again) {
      this.fillGap();
    } else {
      this.stored = this.storedMarkers();
      for (const conv of this.conversations.values()) this.recallMarker(conv);
      this.history(null, "last", 0, PAGE);
      this.conversation("#" + MAIN).loaded = true;
      for (const room of this.protected ? [] : remembered) {  // (the server counts an account's)
        const marker = this.storedMarker("#" + room);  // what came since this browser last read the room
        if (marker !== null) this.history("#" + room, "after", marker, GAP_PAGE);
      }
      const last = this.storedActive();
      if (last && (last === "#" + MAIN || remembered.includes(last.slice(1)) || last[0] === "@")) {
        if (last[0] === "@") this.conversation(last).joined = true;
        this.open(last);
      }
    }
    this.send("NAMES", "#" + MAIN);
    this.changed("status");
  }

  /** After a reconnect: each conversation's messages after the last one it has, by id. */
  fillGap() {
    this.history(null, "after", this.mainAndDmsLast(), GAP_PAGE);
    for (const conv of this.conversations.values()) {
      if (conv.kind === "room" && conv.name !== MAIN && conv.loaded && !conv.detached) {
        this.history(conv.key, "after", conv.lastId, GAP_PAGE);
      }
    }
  }

  mainAndDmsLast() {
    let last = 0;
    for (const conv of this.conversations.values()) {
      if ((conv.kind === "dm" || conv.name === MAIN) && !conv.detached) last = Math.max(last, conv.lastId);
    }
    return last;
  }

  onGoodbye(event) {
    if (FINAL.some((f) => event.reason.startsWith(f))) {
      this.state = "ended";
      this.ended = event.reason;
    }
    this.changed("status");
  }

  onErrorReply(event) {
    if (event.code === "invite-only" || event.code === "banned") this.pendingSwitch = null;  // a /join refused
    if (SEND_ERRORS.has(event.code) && this.sends.length) {
      const send = this.sends.shift();
      this.changed("notice", { key: send.key, text: `not sent: ${event.text}`, error: true, unsent: send.text });
      return;
    }
    if (HISTORY_ERRORS.has(event.code) && this.histories.length) {
      const asked = this.histories.shift();
      if (asked.older) this.conversation(asked.older).loadingOlder = false;
      if (asked.mode === "search" && this.searchResults && this.searchResults.seq === asked.seq) {
        this.searchResults.waiting -= 1;
        if (!this.searchResults.waiting) this.changed("search");
      }
    }
    if (this.state !== "online" && REFUSALS.has(event.code)) {  // the name was refused to this tab
      this.state = "ended";
      this.ended = event.text;
      this.refused = event.code;
    }
    this.changed("notice", { key: this.active, text: event.text, error: true, code: event.code });
  }

  onAcknowledged(event) {
    const send = this.sends.shift();
    if (!send) return;
    let kind = send.kind === "reply" ? (send.recipient ? "dm" : "msg") : send.kind;
    if (kind === "react") {  // the same reaction again takes ours back
      const target = this.find(send.ref);
      const given = target && (target.reactions || []).find(([r]) => r === send.text);
      if (given && given[1].includes(this.name)) kind = "unreact";
    }
    const msg = { id: event.id, ts: event.ts, sender: this.name, text: send.text, kind,
      recipient: send.recipient, room: send.room, ref: send.ref || 0 };
    this.deliver([msg], true);
  }

  onDelivered(event) {
    this.deliver([event.message], true);
  }

  onHistoryPage(event) {
    const asked = this.histories.shift() || { key: null, mode: "last" };
    if (asked.mode === "search") {
      const results = this.searchResults;
      if (!results || results.seq !== asked.seq) return;  // (an older search's answer)
      const seen = new Set(results.messages.map((m) => m.id));
      results.messages.push(...event.messages.filter((m) => !seen.has(m.id)));
      results.messages.sort((a, b) => b.id - a.id);
      results.waiting -= 1;
      if (!results.waiting) this.changed("search");
      return;
    }
    this.deliver(event.messages, false);
    if (asked.older) {
      const conv = this.conversation(asked.older);
      conv.loadingOlder = false;
      const mine = event.messages.filter((m) => this.keyOf(m) === asked.older);
      if (event.messages.length < asked.count && !event.more) conv.hasOlder = false;
      else if (!mine.length) this.loadOlder(asked.older);  // a page of other conversations' messages
      this.changed("older", { key: asked.older });
    }
    if (asked.key && asked.mode === "last" && event.messages.length < asked.count && !event.more) {
      this.conversation(asked.key).hasOlder = false;
    }
    if (asked.mode === "after" && event.more) {
      const conv = asked.key ? this.conversation(asked.key) : null;
      this.history(asked.key, "after", conv ? conv.lastId : this.mainAndDmsLast(), GAP_PAGE);
    }
    if (asked.jump) this.changed("jump", { key: this.active, id: asked.jump });
  }

  keyOf(msg) {
    if (msg.recipient) return "@" + (msg.sender === this.name ? msg.recipient : msg.sender);
    return "#" + msg.room;
  }

  /** An edit, a deletion or a reaction, applied to the message it names (if this tab has it). */
  apply(action) {
    const key = this.keyOf(action);
    const target = this.conversation(key).messages.find((m) => m.id === action.ref);
    this.lastId = Math.max(this.lastId, action.id);
    if (!target) return null;
    if (action.kind === "edit" && !target.deleted) {
      target.text = action.text;
      target.edited = action.ts;
    } else if (action.kind === "delete") {
      target.text = "";
      target.deleted = action.ts;
      target.reactions = [];
    } else if (action.kind === "react" || action.kind === "unreact") {
      const reactions = (target.reactions || []).map(([r, names]) => [r, names.filter((n) => n !== action.sender)]);
      const given = reactions.find(([r]) => r === action.text);
      if (action.kind === "react") {
        if (given) given[1].push(action.sender);
        else reactions.push([action.text, [action.sender]]);
      }
      target.reactions = reactions.filter(([, names]) => names.length);
    }
    return key;
  }

  /** Messages into their conversations; `live` ones (not history) count as unread where unseen. */
  deliver(messages, live) {
    const touched = new Set();
    for (const msg of messages) {
      if (ACTIONS.has(msg.kind)) {
        const key = this.apply(msg);
        if (key) touched.add(key);
        continue;
      }
      const key = this.keyOf(msg);
      const conv = this.conversation(key);
      if (conv.kind === "dm") conv.joined = true;
      if (conv.detached && live) {
        if (msg.sender !== this.name) conv.unread += 1;
        touched.add(key);
        continue;
      }
      if (!conv.add([msg])) continue;
      this.lastId = Math.max(this.lastId, msg.id);
      touched.add(key);
      const own = msg.sender === this.name;
      // live, or from the history but after what this browser had read (an account's rooms: the server's
      // count, in ROOMS)
      const counted = live || (conv.known && !(this.protected && conv.kind === "room"));
      if (counted && !own && msg.id > conv.marker) {
        const seen = this.visible && this.active === key;
        if (!seen) {
          if (!this.hasOwnMarker(key)) this.storeMarker(key, conv.marker);  // its unread lines outlive a reload
          conv.unread += 1;
          if (mentions(msg.text, this.name)) conv.mentions += 1;
          if (live) this.changed("alert", { key, message: msg, mention: conv.kind === "dm" || mentions(msg.text, this.name) });
        }
      }
    }
    this.storeSeen();
    for (const key of touched) {
      this.changed("messages", { key, live });
      if (live && key === this.active && this.visible) this.markRead(key);
    }
    if (touched.size) this.changed("conversations");
  }

  onRoomInfo(event) {
    this.rooms = this.rooms.filter((r) => r.name !== event.name).concat([event]);
    if (event.joined) {
      const conv = this.conversation("#" + event.name);
      conv.joined = true;
      conv.topic = event.topic;
      if (!(this.active === conv.key && this.visible)) {
        conv.unread = this.protected ? event.unread : Math.max(conv.unread, event.unread);
        conv.mentions = this.protected ? event.mentions : Math.max(conv.mentions, event.mentions);
      }
      this.remember(event.name, true);
    }
    this.changed("conversations");
  }

  onEndOfList() {}

  onRoomJoined(event) {
    const conv = this.conversation("#" + event.names.room);
    const fresh = !conv.joined;
    conv.joined = true;
    if (fresh && !this.hasOwnMarker(conv.key)) this.storeMarker(conv.key, this.lastId);  // unread from here on
    if (event.topic) conv.topic = event.topic.text;
    this.setMembers(conv, event.names.users);
    this.remember(conv.name, true);
    if (fresh && this.pendingSwitch === conv.name) {
      this.pendingSwitch = null;
      this.open(conv.key);
    }
    this.changed("conversations");
    this.changed("members", { key: conv.key });
  }

  onRoomNames(event) {
    this.setMembers(this.conversation("#" + event.room), event.users);
    this.changed("members", { key: "#" + event.room });
  }

  onUserList(event) {
    this.changed("who", { users: event.users });
  }

  setMembers(conv, users) {
    conv.members = new Map(users.map((u) => [u.name, { bot: u.bot, devices: u.devices, role: u.role }]));
  }

  onTopic(event) {
    const conv = this.conversation("#" + event.room);
    conv.topic = event.text;
    this.changed("conversations");
    if (event.setter) this.changed("notice", { key: conv.key, text: `${event.setter} set the topic: ${event.text}` });
  }

  onEntered(event) {
    const conv = this.conversation("#" + event.room);
    if (!conv.members.has(event.name)) conv.members.set(event.name, { bot: false, devices: 1 });
    this.changed("members", { key: conv.key });
    this.changed("notice", { key: conv.key, text: `${event.name} joined #${event.room}`, quiet: true });
  }

  onExited(event) {
    const conv = this.conversation("#" + event.room);
    conv.members.delete(event.name);
    this.changed("members", { key: conv.key });
    if (event.reason.startsWith("removed: ")) return;  // a kick or a ban: its moderation line said it
    this.changed("notice", { key: conv.key, text: `${event.name} left #${event.room}` +
      (event.reason ? ` (${event.reason})` : ""), quiet: true });
  }

  onJoined(event) {
    const main = this.conversation("#" + MAIN);
    if (!main.members.has(event.name)) main.members.set(event.name, { bot: false, devices: 1 });
    this.changed("members", { key: main.key });
    this.changed("notice", { key: main.key, text: `${event.name} is online`, quiet: true });
  }

  onLeft(event) {
    for (const conv of this.conversations.values()) {
      if (conv.members.delete(event.name)) this.changed("members", { key: conv.key });
    }
    this.changed("notice", { key: "#" + MAIN, text: `${event.name} left (${event.reason})`, quiet: true });
  }

  onConfirmed(event) {
    if (event.verb === "MARK") {  // read on this or another of the account's devices
      const [where, upto] = event.arg.split("|");
      const key = where[0] === "@" ? "@" + where.slice(1) : where;
      const conv = this.conversations.get(key) ||
        [...this.conversations.values()].find((c) => c.kind === "dm" && "@" + c.name.toLowerCase() === key.toLowerCase());
      if (!conv) return;
      const id = Number(upto);
      if (id > conv.marker) conv.marker = id;
      const after = conv.messages.filter((m) => m.id > conv.marker && m.sender !== this.name);
      conv.unread = Math.min(conv.unread, after.length);
      conv.mentions = Math.min(conv.mentions, after.filter((m) => mentions(m.text, this.name)).length);
      this.changed("conversations");
    } else if (event.verb === "REGISTER") {  // this tab protected its name: its login proves it now
      this.protected = true;
      this.changed("protected");
    } else if (event.verb === "MODE") {
      const [room, modes] = event.arg.split("|");
      this.changed("notice", { key: room, text: `${room}: ${describeModes(modes)}` });
    } else if (event.verb === "PART") {
      const conv = this.conversation(event.arg);
      conv.joined = false;
      conv.loaded = false;
      conv.messages = [];
      this.remember(conv.name, false);
      if (this.active === conv.key) this.active = "#" + MAIN;
      this.changed("conversations");
    }
  }

  onPong() {}

  onModerated(event) {
    const roles = { op: "op", deop: "", voice: "voice", devoice: "" };
    const conv = this.conversations.get("#" + event.room);
    const member = conv && conv.members.get(event.target);
    if (member && event.action in roles && member.role !== "owner") {  // the member list shows it at once
      member.role = roles[event.action];
      this.changed("members", { key: conv.key });
    }
    const out = event.target === this.name && (event.action === "kick" || event.action === "ban");
    const key = out ? "#" + MAIN : "#" + event.room;  // (put out of a room: said where one goes)
    this.changed("notice", { key: this.conversations.has(key) ? key : this.active, text: moderationText(event, this.name),
      error: event.target === this.name && ["kick", "ban", "mute"].includes(event.action) });
  }

  onBanInfo(event) {
    const until = event.until ? ` until ${new Date(event.until * 1000).toLocaleString()}` : "";
    this.changed("notice", { key: event.room ? "#" + event.room : this.active,
      text: `banned: ${event.pattern}${until} by ${event.by}${event.reason ? ": " + event.reason : ""}` });
  }

  // --- what this browser keeps of the chat: rooms joined, read markers, the open conversation ----------
  // (a free name's are nobody's but the browser's; a protected name's markers are the account's too)

  store(what, value) {
    try {
      localStorage.setItem(`chatctl.${what}.${this.name}`, JSON.stringify(value));
    } catch {
      // private windows may refuse storage: then this browser remembers nothing
    }
  }

  recall(what, fallback) {
    try {
      return JSON.parse(localStorage.getItem(`chatctl.${what}.${this.name}`)) ?? fallback;
    } catch {
      return fallback;
    }
  }

  storedMarkers() {
    return this.recall("read", {});
  }

  storedActive() {
    return this.recall("active", "");
  }

  /** Read up to here in `key`, as this browser last knew it: its own marker, else ("*") the newest id
   * it had seen when it last wrote one down (a conversation that began while it was away is unread from
   * its start); null: this browser never kept anything (everything in the history counts as read). */
  storedMarker(key) {
    const stored = this.stored || {};
    return key in stored ? stored[key] : "*" in stored ? stored["*"] : null;
  }

  recallMarker(conv) {
    const marker = this.storedMarker(conv.key);
    conv.known = marker !== null;
    conv.marker = Math.max(conv.marker, marker || 0);
  }

  hasOwnMarker(key) {
    return key in (this.stored || {});
  }

  /** Keep `key`'s read marker.  "*" moves too: every conversation with unread lines has a marker of its
   * own (written when its first one came), so everything else up to the newest id is read. */
  storeMarker(key, id) {
    if (!this.name) return;
    this.stored = this.stored || this.storedMarkers();
    this.stored[key] = id;
    this.stored["*"] = Math.max(this.stored["*"] || 0, this.lastId);
    this.store("read", this.stored);
    this.seenAt = Date.now();
  }

  storeSeen() {
    if (!this.name || this.state !== "online" || Date.now() - (this.seenAt || 0) < 2000) return;
    this.stored = this.stored || this.storedMarkers();
    if ((this.stored["*"] || 0) >= this.lastId) return;
    this.stored["*"] = this.lastId;
    this.store("read", this.stored);
    this.seenAt = Date.now();
  }

  rememberedRooms() {
    try {
      return JSON.parse(localStorage.getItem(`chatctl.rooms.${this.name}`) || "[]");
    } catch {
      return [];
    }
  }

  remember(room, joined) {
    const rooms = new Set(this.rememberedRooms());
    if (joined) rooms.add(room);
    else rooms.delete(room);
    try {
      localStorage.setItem(`chatctl.rooms.${this.name}`, JSON.stringify([...rooms]));
    } catch {
      // private windows may refuse storage: rooms are then joined again by hand
    }
  }
}
