-- examples/web_bench.lua - chats streamed to many HTTP clients: C concurrent
-- Server-Sent Events clients of examples/web.lua (its own process) on one
-- chat and over many chats, a writer process appending R messages/s; and
-- beside each, in the same run, the same delivery through chatstream
-- without HTTP (C subscriptions in this process, one cqueues loop).
-- Prints, per row: messages/s written, events delivered (and lost or twice:
-- must be 0), the delivery latency p50/p99/max (the writer's clock in the
-- message to the moment a client read it) and the serving process's CPU
-- per delivered event.
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/web_bench.lua
--       [--clients C] [--chats K] [--rate R] [--seconds S]
--
-- Without options it runs two shapes: 1,000 clients over 100 chats at 500
-- messages/s, and 1,000 clients on one chat at 20 messages/s. The clients
-- run in this process (raw sockets on cqueues, HTTP/1.0), so they share the
-- machine with the server: on 2 cores the figures include that contention.
local cqueues = require("cqueues")
local socket = require("cqueues.socket")
local chatstream = require("chatstream")
local cs = require("chatstream.cqueues")

local DSN = os.getenv("CHATSTREAM_DSN")
local SCHEMA = os.getenv("CHATSTREAM_SCHEMA")
local LUA = arg[-1] or "lua5.4"
local HERE = arg[0]:match("^(.*/)") or "./"

local function shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- The writer process: `rate` messages/s round-robin over chats for secs.
local function writer(chats, rate, secs)
  local w = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
  local n = math.floor(rate * secs)
  local t0 = chatstream.now()
  for i = 1, n do
    local due = t0 + (i - 1) / rate
    local wait = due - chatstream.now()
    if wait > 0 then
      chatstream.sleep(wait)
    end
    assert(w:append(chats[(i - 1) % #chats + 1], { role = "user", content = ("%.6f"):format(chatstream.now()) }))
    if i == 1 then
      io.stdout:write("started\n")
      io.stdout:flush()
    end
  end
  io.stdout:write(("done %d %.3f\n"):format(n, chatstream.now() - t0))
  io.stdout:flush()
  w:close()
end

local function cpu_of(pid) -- seconds of CPU the process has used
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then
    return 0
  end
  local stat = f:read("a")
  f:close()
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do
    fields[#fields + 1] = x
  end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100 -- utime, stime: clock ticks
end

local function percentile(xs, p)
  return xs[math.max(1, math.ceil(#xs * p))] or 0
end

-- Starts examples/web.lua on a free port; returns its pid and port.
local function start_server()
  local cmd = ("ulimit -n 8192 2>/dev/null; echo $$; CHATSTREAM_DSN=%s CHATSTREAM_SCHEMA=%s exec %s %s --port 0")
    :format(shq(DSN), shq(SCHEMA or ""), LUA, shq(HERE .. "web.lua"))
  local h = assert(io.popen(cmd, "r"))
  local pid = assert(math.tointeger(tonumber(h:read("l"))), "the server did not start")
  local port = math.tointeger(tonumber((h:read("l") or ""):match("127%.0%.0%.1:(%d+)/") or ""))
  assert(port, "the server did not say where it serves")
  return { pid = pid, port = port, h = h }
end

local function stop_server(srv)
  os.execute("kill " .. srv.pid)
  srv.h:close()
end

-- One row: C clients over the chats, the writer, until every client has
-- every message (or 10 s after the writer is done).
local function run(o, mode)
  local setup = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
  assert(setup:migrate())
  local chats = {}
  for c = 1, o.chats do
    chats[c] = assert(setup:create_chat({ owner = "web" }))
  end
  setup:close()
  local cq = cqueues.new()
  local lat, got, dups, disorder, ready, broken = {}, 0, 0, 0, 0, 0
  local srv, store
  local function deliver(last, id, stamp, now)
    if id <= last then
      if id == last then dups = dups + 1 else disorder = disorder + 1 end
      return last
    end
    got = got + 1
    lat[#lat + 1] = now - stamp
    return id
  end
  if mode == "http" then
    srv = start_server()
    for i = 1, o.clients do
      local chat = chats[(i - 1) % o.chats + 1]
      cq:wrap(function()
        local sock = socket.connect({ host = "127.0.0.1", port = srv.port })
        sock:onerror(function(_, _, e) return e end)
        sock:setmode("b", "b")
        if not sock:xwrite(("GET /chats/%d/events HTTP/1.0\r\n\r\n"):format(chat), "n") then
          broken = broken + 1
          return
        end
        local buf, last, seen_status = "", 0, false
        while true do
          local data = sock:xread(-65536, "b")
          if not data then
            break
          end
          local now = chatstream.now()
          buf = buf .. data
          local cut = buf:match("^.*()\n\n")
          if cut then
            local part = buf:sub(1, cut + 1)
            buf = buf:sub(cut + 2)
            if not seen_status and part:find("event: status", 1, true) then
              seen_status, ready = true, ready + 1
            end
            for id, json in part:gmatch("event: message\nid: (%d+)\ndata: ([^\n]*)") do
              last = deliver(last, tonumber(id), tonumber(json:match('"content":"([%d.]+)"')), now)
            end
          end
        end
        sock:close()
      end)
      if i % 100 == 0 then -- the connects in batches: the listen backlog is finite
        local want = i
        local deadline = cqueues.monotime() + 20
        while ready < want and cqueues.monotime() < deadline do
          assert(cq:step(0.05))
        end
      end
    end
  else
    cq:wrap(function()
      store = assert(cs.open({ dsn = DSN, schema = SCHEMA, share_events = true })) -- as examples/web.lua
      local last = {}
      for i = 1, o.clients do
        local sub = assert(store:subscribe(chats[(i - 1) % o.chats + 1]))
        last[sub] = 0
        ready = ready + 1
      end
      while true do
        for _, sub in ipairs(store:ready()) do
          local ev = sub:next(0)
          while ev do
            if ev.kind == "message" then
              last[sub] = deliver(last[sub], ev.id, tonumber(ev.content), chatstream.now())
            end
            ev = sub:next(0)
          end
        end
        cs.wait(store, 1)
        store:step()
      end
    end)
  end
  local deadline = cqueues.monotime() + 30
  while ready < o.clients and cqueues.monotime() < deadline do
    assert(cq:step(0.05))
  end
  assert(ready == o.clients, ("only %d of %d clients connected"):format(ready, o.clients))
  local ids = {}
  for c, id in ipairs(chats) do
    ids[c] = tostring(id)
  end
  local wcmd = ("%s %s --writer %d %g %s"):format(LUA, shq(arg[0]), o.rate, o.seconds, table.concat(ids, ","))
  local wp = assert(io.popen(wcmd, "r"))
  assert(wp:read("l") == "started", "the writer did not start")
  local cpu0 = mode == "http" and cpu_of(srv.pid) or os.clock()
  local n = math.floor(o.rate * o.seconds)
  local want = n * o.clients // o.chats
  -- the writer's "done" line comes when it ends: read it from a coroutine
  -- would block the loop, so poll the clock instead
  local t_end = cqueues.monotime() + o.seconds + 10
  while got < want and cqueues.monotime() < t_end do
    assert(cq:step(0.05))
  end
  local cpu = (mode == "http" and cpu_of(srv.pid) or os.clock()) - cpu0
  local done = wp:read("l") or ""
  wp:close()
  local written_secs = tonumber(done:match("^done %d+ ([%d.]+)")) or o.seconds
  if srv then
    stop_server(srv)
  end
  table.sort(lat)
  print(("%-8s %8d %6d %10.0f %12s %6d %6d %9.1f %9.1f %9.1f %10.1f"):format(mode, o.clients, o.chats,
    n / written_secs, ("%d/%d"):format(got, want), want - got, dups + disorder + broken, percentile(lat, 0.5) * 1000,
    percentile(lat, 0.99) * 1000, percentile(lat, 1) * 1000, cpu / math.max(1, got) * 1e6))
  if store then
    store:close()
  end
end

local function main()
  if not DSN then
    io.stderr:write("web_bench.lua: set CHATSTREAM_DSN (a PostgreSQL server)\n")
    os.exit(2)
  end
  if arg[1] == "--writer" then
    local chats = {}
    for id in arg[4]:gmatch("%d+") do
      chats[#chats + 1] = tonumber(id)
    end
    return writer(chats, tonumber(arg[2]), tonumber(arg[3]))
  end
  local shapes = {
    { clients = 1000, chats = 100, rate = 500, seconds = 10 },
    { clients = 1000, chats = 1, rate = 20, seconds = 10 },
  }
  local given, i = {}, 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not (k == "clients" or k == "chats" or k == "rate" or k == "seconds") or not tonumber(arg[i + 1]) then
      io.stderr:write("usage: web_bench.lua [--clients C] [--chats K] [--rate R] [--seconds S]\n")
      os.exit(2)
    end
    given[k], i = tonumber(arg[i + 1]), i + 2
  end
  if next(given) then
    local o = { clients = 1000, chats = 100, rate = 500, seconds = 10 }
    for k, v in pairs(given) do
      o[k] = v
    end
    shapes = { o }
  end
  print("SSE clients of examples/web.lua (http) beside the same subscriptions without HTTP (direct), one run")
  print(("%-8s %8s %6s %10s %12s %6s %6s %9s %9s %9s %10s"):format("mode", "clients", "chats", "msgs/s",
    "delivered", "lost", "twice", "p50 ms", "p99 ms", "max ms", "CPU us/ev"))
  for _, o in ipairs(shapes) do
    run(o, "http")
    collectgarbage()
    run(o, "direct")
    collectgarbage()
  end
end

main()
