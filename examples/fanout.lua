-- examples/fanout.lua - many subscriptions in one process: S subscriptions over
-- C chats in one reader store (one event loop's worth), a writer process
-- appending M messages per chat; every subscription must get every message.
-- Prints how long the subscribes took, the delivery latency p50/p99/max
-- (writer's clock in the message to the moment next returned it), and the
-- reader's queries. The reader serves the subscriptions store:ready() names
-- (mode "ready", as an event loop serving many clients does), or sweeps
-- next(0) over every subscription (mode "sweep", the way before the ready
-- list); "both" runs the two one after the other, side by side.
--
-- --share 1 opens the reader with share_events (one event table per
-- message for all its subscriptions), --share 0 without; "both" (the
-- default) runs each mode both ways.
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/fanout.lua [--subs S]
--       [--chats C] [--messages M] [--queue Q] [--mode ready|sweep|both]
--       [--share 0|1|both]
local chatstream = require("chatstream")

local DSN = os.getenv("CHATSTREAM_DSN")
local SCHEMA = os.getenv("CHATSTREAM_SCHEMA")

local function writer(chats, m)
  local w = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
  for i = 1, m do
    for c = 1, #chats do
      assert(w:append(chats[c], { role = "user", content = ("%.6f"):format(chatstream.now()) }))
    end
    chatstream.sleep(0.05) -- a live chat, not a bulk load
    if i == 1 then
      io.stdout:write("started\n")
      io.stdout:flush()
    end
  end
  w:close()
end

local run

local function main()
  if not DSN then
    io.stderr:write("fanout.lua: set CHATSTREAM_DSN (a PostgreSQL server)\n")
    os.exit(2)
  end
  if arg[1] == "--writer" then
    local chats = {}
    for id in arg[3]:gmatch("%d+") do
      chats[#chats + 1] = tonumber(id)
    end
    return writer(chats, tonumber(arg[2]))
  end
  local o = { subs = 100000, chats = 10, messages = 20, queue = 64, mode = "ready", share = "both" }
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write("usage: fanout.lua [--subs S] [--chats C] [--messages M] [--queue Q] [--mode ready|sweep|both]"
        .. " [--share 0|1|both]\n")
      os.exit(2)
    end
    if k == "mode" then
      o.mode = arg[i + 1]
      assert(o.mode == "ready" or o.mode == "sweep" or o.mode == "both", "bad --mode")
    elseif k == "share" then
      o.share = arg[i + 1]
      assert(o.share == "0" or o.share == "1" or o.share == "both", "bad --share")
    else
      o[k] = math.tointeger(tonumber(arg[i + 1])) or error("bad --" .. k)
    end
    i = i + 2
  end
  print(("fan-out: %d subscriptions over %d chats in one store, %d messages per chat (queue_size %d)")
    :format(o.subs, o.chats, o.messages, o.queue))
  print(("%-7s %-6s %12s %12s %12s %10s %10s %10s %12s"):format("mode", "share", "subscribe s", "sub queries",
    "delivered", "p50 ms", "p99 ms", "max ms", "queries/msg"))
  for _, mode in ipairs(o.mode == "both" and { "sweep", "ready" } or { o.mode }) do
    for _, share in ipairs(o.share == "both" and { false, true } or { o.share == "1" }) do
      run(o, mode, share)
      collectgarbage()
    end
  end
end

run = function(o, mode, share)
  local r = assert(chatstream.open({ dsn = DSN, schema = SCHEMA, queue_size = o.queue, share_events = share }))
  assert(r:migrate())
  local chats = {}
  for c = 1, o.chats do
    chats[c] = assert(r:create_chat({ owner = "bench" }))
  end
  local t0, subs = chatstream.now(), {}
  local q0 = r:stats().queries
  for s = 1, o.subs do
    subs[s] = assert(r:subscribe(chats[(s - 1) % o.chats + 1]))
    for _ in subs[s]:events(0) do end -- the snapshot: the status only
  end
  local t_sub = chatstream.now() - t0
  local q_sub = r:stats().queries - q0
  local ids = {}
  for c, id in ipairs(chats) do
    ids[c] = tostring(id)
  end
  local cmd = ("%q %q --writer %d %s"):format(arg[-1] or "lua5.4", arg[0], o.messages, table.concat(ids, ","))
  local wp = assert(io.popen(cmd))
  assert(wp:read("l") == "started", "the writer did not start")
  local want = o.subs * o.messages
  local lat, got, deadline = {}, 0, chatstream.now() + 120
  local q1 = r:stats().queries
  while got < want and chatstream.now() < deadline do
    local any = false
    -- ready: the subscriptions with events (store:ready()), each until it
    -- has no more (a round per event would rebuild a list of up to S
    -- subscriptions each round); sweep: every subscription
    for _, sub in ipairs(mode == "ready" and r:ready() or subs) do
      local ev = sub:next(0)
      while ev do
        if ev.kind == "message" then
          got = got + 1
          lat[#lat + 1] = chatstream.now() - tonumber(ev.content)
          any = true
        end
        ev = sub:next(0)
      end
    end
    if not any then
      r:step(0.01)
    end
  end
  wp:close()
  table.sort(lat)
  local function pct(p)
    return #lat > 0 and lat[math.max(1, math.ceil(#lat * p))] * 1000 or 0
  end
  print(("%-7s %-6s %12.2f %12d %12s %10.1f %10.1f %10.1f %12.4f"):format(mode, share and "yes" or "no", t_sub, q_sub,
    ("%d/%d"):format(got, want),
    pct(0.5), pct(0.99), pct(1), (r:stats().queries - q1) / math.max(1, got)))
  r:close()
end

main()
