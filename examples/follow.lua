-- examples/follow.lua - one process follows many chats inside a cqueues loop:
-- a follower serves the subscriptions that have events (store:ready()), a
-- writer appends through the same store, and a 10 ms ticker shows the loop
-- was never blocked. On the embedded store, or PostgreSQL with CHATSTREAM_DSN.
--
--   lua5.4 examples/follow.lua [--chats C] [--messages M]
local cqueues = require("cqueues")
local cs = require("chatstream.cqueues")

local function options()
  local o = { chats = 50, messages = 1000 }
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write("usage: follow.lua [--chats C] [--messages M]\n")
      os.exit(2)
    end
    o[k] = math.tointeger(tonumber(arg[i + 1])) or error("bad --" .. k)
    i = i + 2
  end
  return o
end

local function percentile(xs, p)
  table.sort(xs)
  return xs[math.max(1, math.ceil(#xs * p))] or 0
end

local function main()
  local o = options()
  local dsn = os.getenv("CHATSTREAM_DSN")
  dsn = dsn ~= "" and dsn or nil
  local store = assert(cs.open(dsn and { dsn = dsn, schema = os.getenv("CHATSTREAM_SCHEMA") } or nil))
  if dsn then
    assert(store:migrate())
  end
  local cq = cqueues.new()
  local chats, subs, seen, last = {}, {}, {}, {}
  local delivered, dups, disorder, done = 0, 0, 0, false
  local lateness = {}

  cq:wrap(function() -- the follower
    for c = 1, o.chats do
      chats[c] = assert(store:create_chat({ owner = "follow" }))
      subs[c] = assert(store:subscribe(chats[c]))
      last[subs[c]] = 0
    end
    while true do
      for _, sub in ipairs(store:ready()) do
        while true do
          local ev = sub:next(0)
          if not ev then break end
          if ev.kind == "message" then
            if seen[ev.id] then dups = dups + 1 end
            if ev.id < last[sub] then disorder = disorder + 1 end
            seen[ev.id], last[sub] = true, ev.id
            delivered = delivered + 1
          end
        end
      end
      if delivered >= o.messages then break end
      cs.wait(store, 1) -- until the store has work, at most a second
      store:step()
    end
    done = true
  end)

  cq:wrap(function() -- the writer, through the same store
    while not chats[o.chats] do cqueues.sleep(0.01) end
    for i = 1, o.messages do
      local chat = chats[(i - 1) % o.chats + 1]
      assert(store:append(chat, { { role = "user", content = "message " .. i } }))
    end
  end)

  cq:wrap(function() -- the ticker: how late a 10 ms timer fires
    local want = cqueues.monotime() + 0.01
    while not done do
      cqueues.sleep(math.max(0, want - cqueues.monotime()))
      local now = cqueues.monotime()
      lateness[#lateness + 1] = math.max(0, now - want) * 1000
      want = now + 0.01
    end
  end)

  local t0 = cqueues.monotime()
  assert(cq:loop())
  local secs = cqueues.monotime() - t0
  print(("store: %s, %d chats, %d messages in %.2f s (%.0f msgs/s)"):format(store:kind(), o.chats, o.messages,
    secs, o.messages / secs))
  print(("delivered %d, duplicates %d, out of order %d"):format(delivered, dups, disorder))
  print(("ticker late by: p50 %.2f ms, p99 %.2f ms, max %.2f ms (%d ticks)"):format(percentile(lateness, 0.5),
    percentile(lateness, 0.99), percentile(lateness, 1), #lateness))
  cs.close(store)
  if delivered ~= o.messages or dups > 0 or disorder > 0 then
    os.exit(1)
  end
end

main()
