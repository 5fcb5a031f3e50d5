-- examples/loop_bench.lua - one process under cqueues serving S subscriptions
-- over C chats while writer processes append R messages/s in all. During the
-- run another session holds one chat's row lock for 1.5 s while the loop
-- itself appends to that chat, and the loop store's listener backend is
-- killed. Printed per mode, side by side in one run:
--   loop      the store opened through chatstream.cqueues (calls yield)
--   blocking  the plain store in the same loop (calls block the loop)
-- a 10 ms ticker's lateness (p50/p99/max), messages delivered per second and
-- the delivery latency p50/p99 (writer's clock in the message to the moment
-- the follower got it).
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/loop_bench.lua [--subs S]
--       [--chats C] [--rate R] [--writers W] [--seconds T] [--mode loop|blocking|both]
local chatstream = require("chatstream")

local DSN = os.getenv("CHATSTREAM_DSN")
local SCHEMA = os.getenv("CHATSTREAM_SCHEMA") or "loop_bench"

local function shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- psql in the background (it is not waited for: the loop goes on).
local function psql_background(sql)
  local h = io.popen(("env -u LD_PRELOAD psql -X -q %s -c %s >/dev/null 2>&1 & echo $!"):format(shq(DSN), shq(sql)))
  h:read("a")
  h:close()
end

-- A writer process: its share of the rate, for T seconds, into the chats.
local function writer(rate, seconds, chats)
  local w = assert(chatstream.open({ dsn = DSN, schema = SCHEMA, poll_interval = 0 }))
  io.stdout:write("started\n")
  io.stdout:flush()
  local t0, n = chatstream.now(), 0
  while chatstream.now() - t0 < seconds do
    n = n + 1
    local chat = chats[(n - 1) % #chats + 1]
    assert(w:append(chat, { role = "user", content = ("%.6f"):format(chatstream.now()) }))
    local ahead = t0 + n / rate - chatstream.now()
    if ahead > 0 then
      chatstream.sleep(ahead)
    end
  end
  io.stdout:write(("wrote %d\n"):format(n))
  w:close()
end

local function pct(xs, p)
  return #xs > 0 and xs[math.max(1, math.ceil(#xs * p))] or 0
end

local function run(o, mode)
  local cqueues = require("cqueues")
  local mod = mode == "loop" and require("chatstream.cqueues") or chatstream
  local store = assert(mod.open({ dsn = DSN, schema = SCHEMA, queue_size = 256 }))
  assert(store:migrate())
  local chats = {}
  for c = 1, o.chats do
    chats[c] = assert(store:create_chat({ owner = "bench" }))
  end
  local locked = assert(store:create_chat({ owner = "bench" })) -- the loop's own writes
  local subs = {} -- kept open: the follower finds them through store:ready()
  for s = 1, o.subs do
    subs[s] = assert(store:subscribe(chats[(s - 1) % o.chats + 1]))
  end
  assert(#subs == o.subs)
  local ids = {}
  for c, id in ipairs(chats) do
    ids[c] = tostring(id)
  end
  local writers = {}
  for w = 1, o.writers do
    local mine = {}
    for c = w, #ids, o.writers do
      mine[#mine + 1] = ids[c]
    end
    local cmd = ("%s %s --writer %s %s %s"):format(shq(arg[-1] or "lua5.4"), shq(arg[0]), o.rate / o.writers,
      o.seconds, table.concat(mine, ","))
    writers[w] = assert(io.popen(cmd))
  end
  for _, wp in ipairs(writers) do
    assert(wp:read("l") == "started", "a writer did not start")
  end
  local late, lat, got, done = {}, {}, 0, false
  local t0 = chatstream.now()
  local cq = cqueues.new()
  cq:wrap(function() -- the follower
    while not done do
      for _, sub in ipairs(store:ready()) do
        local ev = sub:next(0)
        while ev do
          if ev.kind == "message" then
            got = got + 1
            lat[#lat + 1] = (chatstream.now() - tonumber(ev.content)) * 1000
          end
          ev = sub:next(0)
        end
      end
      local t = store:timeout()
      cqueues.poll({ pollfd = store:pollfd(), events = "r", timeout = t and math.min(t, 0.05) or 0.05 })
      store:step()
    end
  end)
  cq:wrap(function() -- the loop's own appends: one held 1.5 s by a row lock
    local n = 0
    while not done do
      n = n + 1
      assert(store:append(locked, { role = "user", content = ("%.6f"):format(chatstream.now()) }))
      cqueues.sleep(0.05)
    end
  end)
  cq:wrap(function() -- the lock, then the listener kill
    cqueues.sleep(o.seconds * 0.3)
    if o.lock ~= 0 then
      psql_background(("BEGIN; SELECT 1 FROM %s.chats WHERE id = %d FOR UPDATE; SELECT pg_sleep(1.5); COMMIT;")
        :format(SCHEMA, locked))
    end
    cqueues.sleep(o.seconds * 0.4)
    if o.kill ~= 0 then
      -- in the background, as the lock: psql run here and waited for would
      -- stop the loop for its own ~40 ms, which is not the store's doing
      psql_background(("SELECT pg_terminate_backend(%d)"):format(store:listener_pid()))
    end
  end)
  cq:wrap(function() -- the ticker
    local want = cqueues.monotime() + 0.01
    while not done do
      cqueues.sleep(math.max(0, want - cqueues.monotime()))
      local now = cqueues.monotime()
      late[#late + 1] = math.max(0, now - want) * 1000
      want = now + 0.01
    end
  end)
  cq:wrap(function() -- the end: the writers are done, what they wrote delivered
    cqueues.sleep(o.seconds + 2)
    done = true
  end)
  assert(cq:loop())
  local secs = chatstream.now() - t0
  local wrote = 0
  for _, wp in ipairs(writers) do
    wrote = wrote + tonumber(wp:read("a"):match("wrote (%d+)") or 0)
    wp:close()
  end
  table.sort(late)
  table.sort(lat)
  print(("%-9s %8d %10.2f %10.2f %10.1f %12s %10.0f %10.1f %10.1f %10d"):format(mode, o.subs, pct(late, 0.5),
    pct(late, 0.99), pct(late, 1), ("%d/%d"):format(got, wrote * (o.subs // o.chats)), got / secs, pct(lat, 0.5),
    pct(lat, 0.99), store:stats().reconnects))
  store:close()
end

local function main()
  if not DSN then
    io.stderr:write("loop_bench.lua: set CHATSTREAM_DSN (a PostgreSQL server)\n")
    os.exit(2)
  end
  if arg[1] == "--writer" then
    local chats = {}
    for id in arg[4]:gmatch("%d+") do
      chats[#chats + 1] = tonumber(id)
    end
    return writer(tonumber(arg[2]), tonumber(arg[3]), chats)
  end
  local o = { subs = 1000, chats = 100, rate = 1000, writers = 2, seconds = 5, mode = "both", lock = 1, kill = 1 }
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write("usage: loop_bench.lua [--subs S] [--chats C] [--rate R] [--writers W] [--seconds T]"
        .. " [--mode loop|blocking|both] [--lock 0|1] [--kill 0|1]\n")
      os.exit(2)
    end
    o[k] = k == "mode" and arg[i + 1] or math.tointeger(tonumber(arg[i + 1])) or error("bad --" .. k)
    i = i + 2
  end
  print(("one cqueues loop: %d subscriptions over %d chats, %d writer processes at %d msgs/s for %d s;%s%s")
    :format(o.subs, o.chats, o.writers, o.rate, o.seconds,
      o.lock ~= 0 and " a row lock held 1.5 s on the loop's own appends;" or "",
      o.kill ~= 0 and " the listener killed" or ""))
  print(("%-9s %8s %10s %10s %10s %12s %10s %10s %10s %10s"):format("mode", "subs", "tick p50", "tick p99",
    "tick max", "delivered", "msgs/s", "lat p50", "lat p99", "reconnects"))
  for _, mode in ipairs(o.mode == "both" and { "blocking", "loop" } or { o.mode }) do
    run(o, mode)
    collectgarbage()
  end
  print("(ticker lateness and latencies in ms)")
end

main()
