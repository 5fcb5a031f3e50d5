-- chatstream.web: chats over HTTP, live to a browser through Server-Sent
-- Events, on lua-http and chatstream.cqueues. One process serves many
-- clients in one cqueues loop:
--
--   local web = require("chatstream.web")
--   local srv = assert(web.listen{store = store, host = "127.0.0.1", port = 8080})
--   assert(srv:loop())
--
-- where store was opened by chatstream.cqueues (so its calls yield to the
-- loop; with share_events = true a message is formatted once for all its
-- clients). The endpoints:
--
--   POST /chats                 -> 201 {"id": N}   (a JSON body {"title": ...} is optional)
--   POST /chats/N/messages      -> 201 {"id": M, "queued": false}: the body is the text of a user
--                                  message, sent through store:send (the lifecycle applies); an
--                                  Idempotency-Key header is its idempotency key
--   GET  /chats/N/events        -> text/event-stream: one event per chatstream event
--                                  (event: message|status|queue|part|truncate); a message (and
--                                  a truncate) carries id: <ev.cursor>, so the browser's
--                                  Last-Event-ID on a reconnect
--                                  resumes with nothing lost and nothing twice (?after=C when
--                                  there is no Last-Event-ID); a comment line every `heartbeat` s
--   GET  /chats/N               -> the chat's page: live through EventSource, posts what is typed
--   GET  /                      -> a page that starts a new chat
--
-- Bad input gets a status, never a crash: 400 (an id that is not a number,
-- an empty or invalid body, a cursor past the chat's end), 404 (an unknown
-- chat or path), 405 (a method the path has not), 413 (a body past
-- max_body), 409 (the chat's state refuses it), 429 (the chat's queue is
-- full: max_queue), 503 (the store failed);
-- every error body is {"error": "..."}.
--
-- One subscription per event stream, all served by one dispatcher over
-- store:ready(): it formats each client's events into the client's outbox
-- (at most max_pending bytes; the rest waits in the subscription) and wakes
-- the client's writer. A slow client holds only its own writer and gets
-- its events at its own pace; one whose write takes longer than
-- write_timeout is let go (its stream ends; a browser reconnects from its
-- Last-Event-ID), so memory stays bounded and nothing is lost.

require("chatstream.lua_http") -- lua-http under 5.4: its 5.3/5.2 paths

local cqueues = require("cqueues")
local condition = require("cqueues.condition")
local http_server = require("http.server")
local http_headers = require("http.headers")
local cjson = require("cjson")
local cs = require("chatstream.cqueues")

local W = {}

W.DEFAULTS = {
  host = "127.0.0.1",
  port = 8080,
  heartbeat = 15, -- seconds between the event stream's comment lines
  retry = 1000, -- ms: the browser's reconnect delay, sent as the stream's retry:
  max_body = 64 * 1024, -- bytes of a request body
  max_pending = 1024 * 1024, -- bytes of events formatted for a client and not yet written
  write_timeout = 30, -- seconds a write to a client may take before the client is let go
  owner = "web", -- the owner of the chats POST /chats creates
}

local STATUS_OF = { ENOTFOUND = 404, EINVAL = 400, EAUTH = 403, ESTATE = 409, EFULL = 429 }

-- Raised by a handler to answer with status and {"error": msg}.
local function refuse(status, msg)
  error({ status = status, msg = msg }, 0)
end

local function refuse_code(err, code)
  refuse(STATUS_OF[code] or 503, err)
end

local function respond(stream, status, body, ctype, extra)
  local h = http_headers.new()
  h:append(":status", tostring(status))
  h:append("content-type", ctype or "application/json")
  h:append("content-length", tostring(#body))
  h:append("cache-control", "no-store")
  for k, v in pairs(extra or {}) do
    h:append(k, v)
  end
  -- a client gone before its answer is its own business: nothing to report
  if stream:write_headers(h, false, 10) then
    stream:write_chunk(body, true, 10)
  end
end

local function respond_json(stream, status, t, extra)
  respond(stream, status, cjson.encode(t), "application/json", extra)
end

-- A positive chat id or cursor from its text; refuse(400) otherwise.
local function integer(s, what, min)
  local n = s and s:match("^%d+$") and math.tointeger(tonumber(s))
  if not n or n < min then
    refuse(400, ("%s must be an integer >= %d, not %q"):format(what, min, tostring(s)))
  end
  return n
end

local function query_param(query, name)
  for k, v in (query or ""):gmatch("([^&=]+)=?([^&]*)") do
    if k == name then
      return v
    end
  end
end

-- The request's body, at most max bytes (refuse(413) past them).
local function read_body(stream, req, max)
  local len = req:get("content-length")
  if len and (not len:match("^%d+$") or tonumber(len) > max) then
    refuse(413, ("the body is limited to %d bytes"):format(max))
  end
  if (req:get("expect") or ""):lower() == "100-continue" then
    stream:write_continue(10) -- the client waits for this before it sends the body
  end
  local body, err = stream:get_body_chars(max + 1, 10)
  if err then
    refuse(400, "cannot read the body: " .. tostring(err))
  end
  body = body or ""
  if #body > max then
    refuse(413, ("the body is limited to %d bytes"):format(max))
  end
  if len and #body ~= tonumber(len) then -- the client went away mid-body: nothing is written
    refuse(400, ("the body ended after %d of its %s bytes"):format(#body, len))
  end
  return body
end

-- The text of message events already formatted, by event table: a store
-- opened with share_events hands the same table to every subscription that
-- gets the message, so it is encoded once, not once per client.
local formatted = setmetatable({}, { __mode = "k" })

-- One SSE event's text for a chatstream event.
local function sse(ev)
  local k = ev.kind
  if k == "message" then
    local text = formatted[ev]
    if not text then
      local data = { id = ev.id, chat_id = ev.chat_id, role = ev.role, content = ev.content, prev_id = ev.prev_id,
        tool_calls = ev.tool_calls, tool_call_id = ev.tool_call_id }
      text = ("event: message\nid: %d\ndata: %s\n\n"):format(ev.cursor, cjson.encode(data))
      formatted[ev] = text
    end
    return text
  elseif k == "status" then
    return ("event: status\ndata: %s\n\n"):format(cjson.encode({ chat_id = ev.chat_id, status = ev.status,
      version = ev.version, error = ev.error, archived = ev.archived }))
  elseif k == "queue" then
    local items = ev.items
    if #items == 0 then
      items = cjson.empty_array
    end
    return ("event: queue\ndata: %s\n\n"):format(cjson.encode({ chat_id = ev.chat_id, items = items }))
  elseif k == "part" then
    return ("event: part\ndata: %s\n\n"):format(cjson.encode({ chat_id = ev.chat_id, text = ev.text,
      after = ev.after }))
  elseif k == "truncate" then
    -- An edit cut the history: every message above `after` is gone. Its id
    -- is its cursor, so a reconnect resumes from the cut.
    return ("event: truncate\nid: %d\ndata: %s\n\n"):format(ev.cursor, cjson.encode({ chat_id = ev.chat_id,
      after = ev.after, history = ev.history }))
  end
  return ("event: %s\ndata: %s\n\n"):format(k, cjson.encode({ chat_id = ev.chat_id }))
end

local PAGE -- the chat's page (below), with CHAT_ID in place of its id
local INDEX

local Server = {}
Server.__index = Server

-- Moves a client's events from its subscription into its outbox, up to
-- max_pending bytes, and wakes its writer. Only the dispatcher pumps; a
-- client let go meanwhile (next may yield for a DB pass) has its
-- subscription closed here, once next has returned.
function Server:pump(c)
  c.pumping = true
  while not c.gone and c.bytes <= self.o.max_pending do
    local ev = c.sub:next(0)
    if not ev then
      break
    end
    local s = sse(ev)
    c.out[#c.out + 1] = s
    c.bytes = c.bytes + #s
  end
  c.pumping = false
  if c.gone then
    c.sub:close()
  end
  c.cv:signal()
end

-- Ends a client's stream (its writer finishes it); nothing more is pumped.
function Server:let_go(c)
  if c.gone then
    return
  end
  c.gone, c.out, c.bytes = true, {}, 0
  self.clients[c.sub] = nil
  if not c.pumping then
    c.sub:close()
  end
  c.cv:signal()
end

-- The dispatcher: serves the subscriptions the store says have events. A
-- client whose outbox is full is passed over: its events wait in its
-- subscription (which keeps at most queue_size of them, then resyncs from
-- its cursor: nothing is lost). When every subscription with events is
-- passed over, the dispatcher waits for a writer to drain its outbox, new
-- notifications or a quarter of a second (the store's fd stays readable
-- while those events wait, and its timeout is 0).
function Server:dispatch()
  while not self.closed do
    local ready, served = self.store:ready(), false
    for _, sub in ipairs(ready) do
      local c = self.clients[sub]
      if c and c.bytes <= self.o.max_pending then
        self:pump(c)
        served = true
      end
    end
    if #ready > 0 and not served then
      -- (not the store's timeout: that is 0 while any subscription is ready)
      cqueues.poll(self.wake, { pollfd = self.store:notify_fd(), events = "r" }, 0.25)
    else
      cs.wait(self.store, 1)
    end
    if self.closed then
      break
    end
    self.store:step()
  end
end

function Server:events(stream, req, chat, query)
  local after = req:get("last-event-id")
  after = after and after ~= "" and integer(after, "Last-Event-ID", 0)
    or integer(query_param(query, "after") or "0", "after", 0)
  local sub, err, code = self.store:subscribe(chat, { after = after })
  if not sub then
    refuse_code(err, code)
  end
  local c = { sub = sub, out = {}, bytes = 0, cv = condition.new() }
  self.clients[sub] = c
  self.wake:signal() -- its snapshot may be waiting
  self.stats.streams = self.stats.streams + 1
  local h = http_headers.new()
  h:append(":status", "200")
  h:append("content-type", "text/event-stream")
  h:append("cache-control", "no-store")
  self.streaming[stream] = true -- an error from here on cannot be an answer
  local ok, werr = stream:write_headers(h, false, self.o.write_timeout)
  local last = cqueues.monotime()
  if ok then
    ok, werr = stream:write_chunk(("retry: %d\n\n"):format(self.o.retry), false, self.o.write_timeout)
  end
  while ok and not c.gone and not self.closed do
    if #c.out == 0 then
      local left = self.o.heartbeat - (cqueues.monotime() - last)
      if left > 0 then
        c.cv:wait(left)
      end
      if #c.out == 0 and not c.gone and cqueues.monotime() - last >= self.o.heartbeat then
        c.out[1] = ": heartbeat\n\n"
      end
    end
    if #c.out > 0 then
      local chunk = table.concat(c.out)
      c.out, c.bytes = {}, 0
      ok, werr = stream:write_chunk(chunk, false, self.o.write_timeout)
      last = cqueues.monotime()
      self.wake:signal() -- its subscription may have events waiting
    end
  end
  if not ok then
    self.stats.let_go = self.stats.let_go + 1
    self.log(("web: chat %d: a client's stream let go: %s"):format(chat, tostring(werr)))
  end
  self:let_go(c)
  if ok then
    stream:write_chunk("", true, self.o.write_timeout) -- the end of a stream let go: the browser resumes
  end
  self.stats.streams = self.stats.streams - 1
end

function Server:post_message(stream, req, chat)
  local body = read_body(stream, req, self.o.max_body)
  if body == "" then
    refuse(400, "the body (the message's text) is empty")
  end
  local key = req:get("idempotency-key")
  local id, queued, code = self.store:send(chat, { content = body, idempotency_key = key ~= "" and key or nil })
  if not id then
    refuse_code(queued, code)
  end
  respond_json(stream, 201, { id = id, queued = queued })
end

function Server:create_chat(stream, req)
  local body = read_body(stream, req, self.o.max_body)
  local title
  if body:match("%S") then
    local ok, t = pcall(cjson.decode, body)
    if not ok or type(t) ~= "table" then
      refuse(400, "the body must be a JSON object ({\"title\": ...}) or empty")
    end
    title = t.title
    if title ~= nil and type(title) ~= "string" then
      refuse(400, "title must be a string")
    end
  end
  local id, err, code = self.store:create_chat({ owner = self.o.owner, title = title })
  if not id then
    refuse_code(err, code)
  end
  respond_json(stream, 201, { id = id })
end

function Server:page(stream, chat)
  local t, err, code = self.store:chat(chat)
  if not t then
    refuse_code(err, code)
  end
  respond(stream, 200, (PAGE:gsub("CHAT_ID", tostring(chat))), "text/html; charset=utf-8")
end

-- Routes one request. Raises refuse(...) for an answer other than success.
function Server:route(stream, req)
  local method, target = req:get(":method"), req:get(":path") or "/"
  local path, query = target:match("^([^?]*)%??(.*)$")
  if path == "/" then
    if method ~= "GET" then
      refuse(405, "GET only")
    end
    return respond(stream, 200, INDEX, "text/html; charset=utf-8")
  elseif path == "/chats" then
    if method ~= "POST" then
      refuse(405, "POST only")
    end
    return self:create_chat(stream, req)
  end
  local id, rest = path:match("^/chats/([^/]+)(.*)$")
  if not id or not (rest == "" or rest == "/messages" or rest == "/events") then
    refuse(404, "no such path: " .. path)
  end
  local chat = integer(id, "the chat id", 1)
  local want = rest == "/messages" and "POST" or "GET"
  if method ~= want then
    refuse(405, want .. " only")
  end
  if rest == "/messages" then
    return self:post_message(stream, req, chat)
  elseif rest == "/events" then
    return self:events(stream, req, chat, query)
  end
  return self:page(stream, chat)
end

-- Ends a stream whose exchange is not complete: a request body not read to
-- its end (refused before it was read, or its client gone mid-body), or an
-- event stream cut by a failed write. Its connection cannot serve another
-- request, and lua-http's own shutdown of such a stream can spin without
-- end once the peer has closed: so the connection's socket is taken and
-- closed here, after a FIN, so the client still reads the answer.
local function finish(stream)
  if stream.state == "closed" then
    return
  end
  local sock = stream.connection:take_socket()
  if not sock then
    return
  end
  cqueues.running():wrap(function()
    local deadline = cqueues.monotime() + 2
    local ok = pcall(sock.shutdown, sock, "w")
    while ok and cqueues.monotime() < deadline do -- what the client still sends, for a clean close
      local got, data = pcall(sock.xread, sock, -65536, "b", 0.2)
      ok = got and data ~= nil
    end
    pcall(sock.close, sock)
  end)
end

function Server:onstream(stream)
  local req = stream:get_headers(10)
  if not req then
    return
  end
  local ok, err = pcall(self.route, self, stream, req)
  if ok then
    return finish(stream)
  end
  local answer = not self.streaming[stream] and stream.state ~= "closed"
  if answer and type(err) == "table" and err.status then
    if pcall(respond_json, stream, err.status, { error = err.msg },
        { connection = err.status == 413 and "close" or nil }) then
      return finish(stream)
    end
  end
  self.stats.errors = self.stats.errors + 1
  self.log(("web: %s %s: %s"):format(req:get(":method"), req:get(":path"), tostring(err and err.msg or err)))
  if answer then
    pcall(respond_json, stream, 500, { error = "internal error" })
  end
  finish(stream)
end

--- Listens and returns the server (srv:loop() runs it; srv.cq is its
-- cqueues controller, where other coroutines may run too). opts: store (a
-- store chatstream.cqueues opened: required), cq, and W.DEFAULTS' keys;
-- port 0 picks a free port (srv:port() says which).
function W.listen(opts)
  local o = {}
  for k, v in pairs(W.DEFAULTS) do
    o[k] = v
  end
  for k, v in pairs(opts) do
    if W.DEFAULTS[k] == nil and k ~= "store" and k ~= "cq" and k ~= "log" then
      error("chatstream.web: unknown option " .. tostring(k), 2)
    end
    o[k] = v
  end
  assert(o.store, "chatstream.web: the store option is required")
  local self = setmetatable({ o = o, store = o.store, clients = {}, closed = false,
    streaming = setmetatable({}, { __mode = "k" }), wake = condition.new(),
    stats = { streams = 0, let_go = 0, errors = 0 }, log = o.log or function(s) io.stderr:write(s, "\n") end },
    Server)
  local srv, err = http_server.listen({
    host = o.host, port = o.port, cq = o.cq, tls = false, reuseaddr = true,
    onstream = function(_, stream)
      self:onstream(stream)
    end,
    onerror = function(_, _, op, e)
      self.log(("web: %s: %s"):format(tostring(op), tostring(e)))
    end,
  })
  if not srv then
    return nil, err
  end
  local ok, lerr = srv:listen()
  if not ok then
    return nil, lerr
  end
  self.http, self.cq = srv, srv.cq
  self.cq:wrap(function()
    self:dispatch()
  end)
  return self
end

function Server:port()
  local _, _, port = self.http:localname()
  return port
end

--- Runs the server until it is closed. A coroutine's error is logged and
-- the others go on (one request never ends the server).
function Server:loop()
  while true do
    local ok, err = self.cq:loop()
    if ok then
      return true
    end
    self.stats.errors = self.stats.errors + 1
    self.log("web: " .. tostring(err))
  end
end

--- Stops listening and lets every client go (the store stays open).
function Server:close()
  self.closed = true
  for _, c in pairs(self.clients) do
    self:let_go(c)
  end
  self.wake:signal()
  self.http:close()
end

INDEX = [[<!doctype html>
<html><head><meta charset="utf-8"><title>chatstream</title></head>
<body><h1>chatstream</h1>
<button id="new">New chat</button>
<script>
document.getElementById("new").onclick = async () => {
  const r = await fetch("/chats", {method: "POST"});
  const j = await r.json();
  location.href = "/chats/" + j.id;
};
</script></body></html>
]]

PAGE = [[<!doctype html>
<html><head><meta charset="utf-8"><title>chat CHAT_ID</title>
<style>
body { font: 15px system-ui, sans-serif; max-width: 44em; margin: 2em auto; }
#messages { list-style: none; padding: 0; }
#messages li { padding: .3em .5em; margin: .2em 0; border-radius: .3em; background: #eef; }
#messages li.user { background: #efe; }
#state { color: #777; }
#part { color: #777; white-space: pre-wrap; }
#queue li { color: #777; }
</style></head>
<body>
<h1>chat CHAT_ID <small id="state">connecting</small></h1>
<ol id="messages"></ol>
<div id="part"></div>
<ul id="queue"></ul>
<form id="form"><input id="text" size="50" autocomplete="off" autofocus> <button>Send</button></form>
<script>
"use strict";
const chat = CHAT_ID;
const list = document.getElementById("messages");
const state = document.getElementById("state");
const part = document.getElementById("part");
const queue = document.getElementById("queue");
// What the page got, for whoever looks (a test reads it): the id of every
// message it shows, in arrival order, the connections opened and the errors
// seen, the chat's status and queue as last heard, the truncates (edits).
window.chatstream = {ids: [], opens: 0, errors: 0, status: null, queue: [], sent: 0, truncates: 0};
const es = new EventSource("/chats/" + chat + "/events");
es.onopen = () => { chatstream.opens++; state.textContent = chatstream.status || "live"; };
es.onerror = () => { chatstream.errors++; state.textContent = "reconnecting"; };
es.addEventListener("message", (e) => {
  const m = JSON.parse(e.data);
  chatstream.ids.push(m.id);
  const li = document.createElement("li");
  li.dataset.id = m.id;
  li.className = m.role;
  li.textContent = m.role + ": " + m.content;
  list.appendChild(li);
  part.textContent = "";
});
es.addEventListener("status", (e) => {
  chatstream.status = JSON.parse(e.data).status;
  state.textContent = chatstream.status;
});
es.addEventListener("queue", (e) => {
  chatstream.queue = JSON.parse(e.data).items.map((i) => i.content);
  queue.replaceChildren(...chatstream.queue.map((text) => {
    const li = document.createElement("li");
    li.textContent = "queued: " + text;
    return li;
  }));
});
es.addEventListener("part", (e) => { part.textContent += JSON.parse(e.data).text; });
// An edit: every message above `after` is gone; what follows continues there.
es.addEventListener("truncate", (e) => {
  const after = JSON.parse(e.data).after;
  chatstream.truncates++;
  chatstream.ids = chatstream.ids.filter((id) => id <= after);
  for (const li of [...list.children]) if (Number(li.dataset.id) > after) li.remove();
  part.textContent = "";
});
const key = () => Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
// Sends text; a failed try is tried again with the same Idempotency-Key,
// so the message is written once however often it is tried.
async function send(text) {
  const k = key();
  for (let wait = 250; ; wait = Math.min(wait * 2, 4000)) {
    try {
      const r = await fetch("/chats/" + chat + "/messages",
        {method: "POST", body: text, headers: {"Idempotency-Key": k}});
      if (r.status < 500) { chatstream.sent++; return r.json(); }
    } catch (e) { /* the server is away: try again */ }
    await new Promise((ok) => setTimeout(ok, wait));
  }
}
window.chatstream.send = send;
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault();
  const input = document.getElementById("text");
  if (input.value !== "") { send(input.value); input.value = ""; }
};
</script></body></html>
]]

return W
