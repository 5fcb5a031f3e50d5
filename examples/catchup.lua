-- examples/catchup.lua - what a reader that fell far behind costs: a subscriber
-- sits idle while N messages of B bytes are written, then reads them all; the
-- table gives its resident memory before and after, the time, and the queries,
-- for each page size (the last one is larger than the backlog: one pass).
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/catchup.lua [--messages N]
--       [--bytes B] [--pages 500,1048576]
--
-- Each page size runs in a process of its own (resident memory does not
-- shrink back), on the store of CHATSTREAM_DSN (schema CHATSTREAM_SCHEMA) or
-- the embedded one.
local chatstream = require("chatstream")

local function rss_kb()
  local f = assert(io.open("/proc/self/status"))
  for line in f:lines() do
    local kb = line:match("^VmRSS:%s+(%d+) kB")
    if kb then
      f:close()
      return tonumber(kb)
    end
  end
  f:close()
  error("no VmRSS")
end

local function opts(extra)
  local o = { dsn = os.getenv("CHATSTREAM_DSN"), schema = os.getenv("CHATSTREAM_SCHEMA") }
  for k, v in pairs(extra or {}) do
    o[k] = v
  end
  if not o.dsn then
    o.dsn, o.schema = nil, nil
    o.memory = extra and extra.memory
  end
  return o
end

-- One run: a child process of this program.
local function run(n, bytes, page)
  local memdb = not os.getenv("CHATSTREAM_DSN") and chatstream.memory() or nil
  local w = assert(chatstream.open(opts({ memory = memdb })))
  assert(w:migrate())
  local r = assert(chatstream.open(opts({ memory = memdb, page_size = page, poll_interval = 0 })))
  local chat = assert(w:create_chat({ owner = "bench" }))
  local sub = assert(r:subscribe(chat))
  for _ in sub:events(0) do end -- the snapshot: the status only
  collectgarbage()
  local before = rss_kb()
  local body = string.rep("x", bytes)
  local batch = {}
  for i = 1, n do
    batch[#batch + 1] = { role = "user", content = body }
    if #batch == 100 or i == n then
      assert(w:append(chat, batch))
      batch = {}
    end
  end
  local q0, t0, got, peak = r:stats().queries, chatstream.now(), 0, before
  local deadline = t0 + 120
  while got < n and chatstream.now() < deadline do
    local ev = sub:next(0.2)
    if ev and ev.kind == "message" then
      got = got + 1
      if got % 1000 == 0 then
        peak = math.max(peak, rss_kb())
      end
    end
  end
  peak = math.max(peak, rss_kb())
  print(("%d %d %d %d %.2f %d"):format(page, before, peak, got, chatstream.now() - t0, r:stats().queries - q0))
end

local function main()
  local o = { messages = 50000, bytes = 2048, pages = "500,1048576" }
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if k == "child" then
      return run(tonumber(arg[i + 1]), tonumber(arg[i + 2]), tonumber(arg[i + 3]))
    end
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write("usage: catchup.lua [--messages N] [--bytes B] [--pages P1,P2]\n")
      os.exit(2)
    end
    o[k] = k == "pages" and arg[i + 1] or math.tointeger(tonumber(arg[i + 1])) or error("bad --" .. k)
    i = i + 2
  end
  print(("catch-up: %d messages of %d bytes written while the reader was idle, on %s"):format(o.messages, o.bytes,
    os.getenv("CHATSTREAM_DSN") and "PostgreSQL" or "the memory store"))
  print(("%-10s %12s %12s %12s %10s %8s %9s"):format("page_size", "RSS before", "RSS peak", "growth", "delivered",
    "seconds", "queries"))
  for page in o.pages:gmatch("%d+") do
    local cmd = ("%q %q --child %d %d %s"):format(arg[-1] or "lua5.4", arg[0], o.messages, o.bytes, page)
    local p = assert(io.popen(cmd))
    local out = p:read("a")
    assert(p:close(), "a run failed:\n" .. out)
    local pg, before, peak, got, secs, queries = out:match("(%d+) (%d+) (%d+) (%d+) ([%d.]+) (%d+)")
    assert(pg, "a run printed nothing:\n" .. out)
    print(("%-10s %9.1f MB %9.1f MB %9.1f MB %10s %8s %9s"):format(pg, before / 1024, peak / 1024,
      (peak - before) / 1024, got, secs, queries))
  end
end

main()
