-- examples/follow_luv.lua - examples/follow.lua's twin on a luv (libuv) loop:
-- a follower serves the subscriptions that have events (store:ready()), a
-- writer appends through the same store, and a 10 ms timer shows the loop
-- was never blocked. On the embedded store, or PostgreSQL with CHATSTREAM_DSN.
--
--   lua5.4 examples/follow_luv.lua [--chats C] [--messages M]
local uv = require("luv")
local cs = require("chatstream.luv")

local function options()
  local o = { chats = 50, messages = 1000 }
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write("usage: follow_luv.lua [--chats C] [--messages M]\n")
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

-- A coroutine started now and resumed by the loop; its error ends the run.
local failed
local function go(f)
  coroutine.wrap(function()
    local ok, err = xpcall(f, debug.traceback)
    if not ok then
      failed = failed or err
      uv.stop()
    end
  end)()
end

local function sleep(s) -- yields to the loop
  local co, t = coroutine.running(), uv.new_timer()
  uv.update_time() -- libuv's clock is cached: it may be stale outside the loop
  t:start(math.ceil(s * 1000), 0, function()
    t:close()
    assert(coroutine.resume(co))
  end)
  coroutine.yield()
end

local function main()
  local o = options()
  local dsn = os.getenv("CHATSTREAM_DSN")
  dsn = dsn ~= "" and dsn or nil
  local store = assert(cs.open(dsn and { dsn = dsn, schema = os.getenv("CHATSTREAM_SCHEMA") } or nil))
  if dsn then
    assert(store:migrate())
  end
  local chats, last, seen = {}, {}, {}
  local delivered, dups, disorder = 0, 0, 0
  local lateness = {}

  go(function() -- the follower
    for c = 1, o.chats do
      chats[c] = assert(store:create_chat({ owner = "follow" }))
      last[assert(store:subscribe(chats[c]))] = 0
    end
    while true do
      for _, sub in ipairs(store:ready()) do
        local ev = sub:next(0)
        while ev do
          if ev.kind == "message" then
            if seen[ev.id] then dups = dups + 1 end
            if ev.id < last[sub] then disorder = disorder + 1 end
            seen[ev.id], last[sub] = true, ev.id
            delivered = delivered + 1
          end
          ev = sub:next(0)
        end
      end
      if delivered >= o.messages then break end
      cs.wait(store, 1) -- until the store has work, at most a second
      store:step()
    end
  end)

  go(function() -- the writer, through the same store
    while not chats[o.chats] do sleep(0.01) end
    for i = 1, o.messages do
      assert(store:append(chats[(i - 1) % o.chats + 1], { { role = "user", content = "message " .. i } }))
    end
  end)

  local ticker, want = uv.new_timer(), uv.hrtime() / 1e9 + 0.01
  uv.update_time() -- libuv's clock is cached: it may be stale outside the loop
  ticker:start(10, 10, function() -- how late a 10 ms timer fires
    local now = uv.hrtime() / 1e9
    lateness[#lateness + 1] = math.max(0, now - want) * 1000
    want = now + 0.01
    if delivered >= o.messages then
      ticker:stop()
      ticker:close()
    end
  end)

  local t0 = uv.hrtime()
  uv.run()
  if failed then
    error(failed, 0)
  end
  local secs = (uv.hrtime() - t0) / 1e9
  print(("store: %s, %d chats, %d messages in %.2f s (%.0f msgs/s)"):format(store:kind(), o.chats, o.messages,
    secs, o.messages / secs))
  print(("delivered %d, duplicates %d, out of order %d"):format(delivered, dups, disorder))
  print(("timer late by: p50 %.2f ms, p99 %.2f ms, max %.2f ms (%d ticks)"):format(percentile(lateness, 0.5),
    percentile(lateness, 0.99), percentile(lateness, 1), #lateness))
  cs.close(store)
  if delivered ~= o.messages or dups > 0 or disorder > 0 then
    os.exit(1)
  end
end

main()
