-- spec/support/sse.lua - an HTTP and Server-Sent Events client for the web
-- specs and examples/web_bench.lua, on lua-http and cqueues.
--
--   S.request(method, url, body, headers) -> status, body, response headers
--     (blocking, outside a loop)
--   S.client(cq, url, opts) -> c: follows an event stream inside cq the way
--     a browser's EventSource does: on the stream's end or an error it
--     connects again after the stream's retry: delay, sending Last-Event-ID
--     (the last id: it got; opts.last_id, the first connect's too).
--     c.messages: the message events' data, decoded, in arrival order;
--     c.ids: their ids; c.connects, c.comments (heartbeat lines),
--     c.kinds[kind] (counts), c.last_id; c.status (the last response's);
--     c.chat_status and c.statuses (the status events' data, a reader may
--     empty it); c.truncates (the truncate events' after, history and id:);
--     on_message(c, data, now) if given. c:stop() ends it.
--   S.run_until(cq, pred, limit, what) steps cq until pred() is true; an
--     error naming `what` after limit seconds.
require("chatstream.lua_http") -- lua-http under 5.4: its 5.3/5.2 paths

local cqueues = require("cqueues")
local http_request = require("http.request")
local cjson = require("cjson")
local ETIMEDOUT = require("cqueues.errno").ETIMEDOUT

local S = {}

-- lua-cjson decodes every number as a float: integral ones back to integers.
local function decode(text)
  local function fix(v)
    if type(v) == "number" then
      return math.tointeger(v) or v
    elseif type(v) == "table" then
      for k, x in pairs(v) do
        v[k] = fix(x)
      end
    end
    return v
  end
  return fix(cjson.decode(text))
end
S.decode = decode

function S.request(method, url, body, headers)
  local req = http_request.new_from_uri(url)
  req.headers:upsert(":method", method)
  for k, v in pairs(headers or {}) do
    req.headers:upsert(k, v)
  end
  if body then
    req:set_body(body)
  end
  local h, stream = req:go(10)
  if not h then
    return nil, stream
  end
  local text = stream:get_body_as_string(10)
  stream:shutdown()
  return math.tointeger(tonumber(h:get(":status"))), text, h
end

--- The JSON body of a request's answer, decoded (nil if it is not JSON).
function S.json(status, text, h)
  local ok, t = pcall(decode, text or "")
  return status, ok and t or nil, h
end

-- Reads one event stream until it ends; returns the reason.
local function follow_once(c)
  local req = http_request.new_from_uri(c.url)
  if c.last_id then
    req.headers:upsert("last-event-id", c.last_id)
  end
  local h, stream = req:go(c.timeout)
  if not h then
    return "connect: " .. tostring(stream)
  end
  c.status = math.tointeger(tonumber(h:get(":status")))
  if c.status ~= 200 then
    stream:shutdown()
    return "status " .. tostring(c.status)
  end
  c.connects = c.connects + 1
  c.stream = stream
  local buf = ""
  while not c.stopped do
    local chunk, err, errno = stream:get_next_chunk(0.25)
    if not chunk and errno == ETIMEDOUT then
      chunk = "" -- nothing yet: look at stopped again
    elseif not chunk then
      stream:shutdown()
      return err and ("read: " .. tostring(err)) or "end"
    end
    buf = buf .. chunk
    while true do
      local i, j = buf:find("\n\n", 1, true)
      if not i then
        break
      end
      local block = buf:sub(1, i - 1)
      buf = buf:sub(j + 1)
      local kind, id, data = "message", nil, nil
      for line in block:gmatch("[^\n]+") do
        local k, v = line:match("^([^:]*):? ?(.*)$")
        if k == "" then
          c.comments = c.comments + 1
        elseif k == "event" then
          kind = v
        elseif k == "id" then
          id = v
        elseif k == "data" then
          data = data and (data .. "\n" .. v) or v
        elseif k == "retry" then
          c.retry = (tonumber(v) or 1000) / 1000
        end
      end
      if id then
        c.last_id = id
      end
      if data then
        c.kinds[kind] = (c.kinds[kind] or 0) + 1
        if kind == "message" then
          local m = decode(data)
          c.messages[#c.messages + 1] = m
          c.ids[#c.ids + 1] = m.id
          if c.on_message then
            c.on_message(c, m, cqueues.monotime())
          end
        elseif kind == "truncate" then
          -- an edit: the messages above after are gone (c.view drops them;
          -- c.ids keeps every message event got)
          local t = decode(data)
          c.truncates = c.truncates or {}
          c.truncates[#c.truncates + 1] = { after = t.after, history = t.history, id = id }
        elseif kind == "status" then
          local st = decode(data)
          c.chat_status = st.status
          c.statuses = c.statuses or {}
          c.statuses[#c.statuses + 1] = st
        end
      end
    end
  end
  stream:shutdown()
  return "stopped"
end

function S.client(cq, url, opts)
  opts = opts or {}
  local c = {
    url = url, messages = {}, ids = {}, kinds = {}, connects = 0, comments = 0, retry = 1, ends = {},
    timeout = opts.timeout or 10, on_message = opts.on_message, reconnect = opts.reconnect ~= false,
    stopped = false, last_id = opts.last_id,
  }
  function c.stop(self)
    self.stopped = true -- the reader ends within a quarter of a second
  end
  cq:wrap(function()
    while not c.stopped do
      local why = follow_once(c)
      c.ends[#c.ends + 1] = why
      if not c.reconnect or c.stopped then
        break
      end
      cqueues.sleep(c.retry)
    end
    c.done = true
  end)
  return c
end

function S.run_until(cq, pred, limit, what)
  local deadline = cqueues.monotime() + limit
  while not pred() do
    if cqueues.monotime() > deadline then
      error(("timed out after %.1f s waiting for %s"):format(limit, what or "a condition"), 2)
    end
    local ok, err = cq:step(0.05)
    if not ok then
      error("the client loop failed: " .. tostring(err), 2)
    end
  end
end

return S
