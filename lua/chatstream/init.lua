-- chatstream: a live, lossless message stream over a durable chat store.
-- A thin layer over the C module "chatstream.core".
local core = require("chatstream.core")

local M = {
  _VERSION = core._VERSION,
  strategies = { "watermark", "rescan", "last_id" },
}

local OPEN_KEYS = {
  memory = true, dsn = true, schema = true, cache_size = true, queue_size = true,
  poll_interval = true, authorize = true, max_chats = true, query_timeout = true,
  stale_after = true, notify_bodies = true, page_size = true, share_events = true,
  max_queue = true, action_timeout = true,
}

--- Opens a store.
-- open()            an embedded memory store of its own
-- open{memory = db} a store on a shared memory database (a replica)
-- open("postgresql://...") / open{dsn = ...}: the PostgreSQL store
function M.open(arg)
  local t = type(arg)
  if arg == nil then
    return core.open()
  elseif t == "table" then
    for k in pairs(arg) do
      if not OPEN_KEYS[k] then
        error("unknown option '" .. tostring(k) .. "'", 2)
      end
    end
  end
  if t == "string" then
    return core.open({ dsn = arg })
  elseif t == "table" then
    return core.open(arg)
  end
  error("bad argument #1 to 'open' (nil, string or table expected, got " .. t .. ")", 2)
end

--- A new shared in-memory database; open{memory = db} gives it a hub.
M.memory = core.memory

--- The wall clock in seconds, sub-microsecond resolution (benchmarks,
-- latencies across processes).
M.now = core.now

--- Sleeps `seconds` (0 to 86400), with sub-millisecond resolution.
M.sleep = core.sleep

--- for ev in store:stream(chat_id, opts, timeout) do ... end
-- Opens a subscription (opts as subscribe's) and iterates its events until
-- it is idle for `timeout` seconds; the subscription is the loop's closing
-- value, so it is closed when the loop ends, by break or error too. A
-- subscription that cannot be opened raises (as errors inside a loop do).
function core.Store.stream(store, chat_id, opts, timeout)
  local sub, err = store:subscribe(chat_id, opts)
  if not sub then
    error(err, 2)
  end
  local iter, state, control = sub:events(timeout)
  return iter, state, control, sub
end

--- One line describing an event, for logs and examples.
function M.format_event(ev)
  if ev.kind == "message" then
    local extra = ""
    if ev.tool_calls then
      extra = " [calls " .. table.concat(ev.tool_calls, ", ") .. "]"
    elseif ev.tool_call_id then
      extra = " [answers " .. ev.tool_call_id .. "]"
    end
    return ("message #%d %s: %s%s"):format(ev.id, ev.role, ev.content, extra)
  elseif ev.kind == "status" then
    return ("status %s (version %d)%s%s"):format(ev.status, ev.version, ev.archived and ", archived" or "",
      ev.error and (": " .. ev.error) or "")
  elseif ev.kind == "queue" then
    local items = {}
    for i, it in ipairs(ev.items) do
      items[i] = ("#%d %q"):format(it.id, it.content)
    end
    return ("queue [%s]"):format(table.concat(items, ", "))
  elseif ev.kind == "part" then
    return ("part %q"):format(ev.text)
  elseif ev.kind == "truncate" then
    return ("truncate: every message above %d is gone (edit %d)"):format(ev.after, ev.history)
  end
  return "event " .. tostring(ev.kind)
end

return M
