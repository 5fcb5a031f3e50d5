-- examples/pollbench.lua - what the backstop poll costs a reader that follows
-- many idle chats: a reader process subscribes S subscriptions to each of C
-- chats and sweeps them with next(0), over and over, as a loop serving many
-- subscriptions does; every poll_interval the backstop poll comes due inside
-- one of those sweeps. Per shape it prints one row for a poll of idle chats
-- and one for a poll after M chats each got a message committed without a
-- notification (the poll must deliver them, once each):
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/pollbench.lua
--       [--shapes 1000x1,10000x1] [--moved 10] [--interval 10]
--
-- statements: the reader's store statements (stats().queries) from the sweep
-- in which the poll began until a sweep that ran none and delivered nothing;
-- sweeps: how many
-- sweeps that took; poll ms: their time; idle ms: one sweep when no poll is
-- due, for comparison; worst next ms: the longest single next(0) among them.
-- On the store of CHATSTREAM_DSN (schema CHATSTREAM_SCHEMA, default
-- chatstream_pollbench, emptied first) or the embedded one.
local chatstream = require("chatstream")

local DSN = os.getenv("CHATSTREAM_DSN")
local SCHEMA = os.getenv("CHATSTREAM_SCHEMA") or "chatstream_pollbench"
local now = chatstream.now

local function open(memdb, extra)
  local o = { poll_interval = 0 }
  if DSN then
    o.dsn, o.schema = DSN, SCHEMA
  else
    o.memory = memdb
  end
  for k, v in pairs(extra or {}) do
    o[k] = v
  end
  return assert(chatstream.open(o))
end

local function psql(sql)
  local q = "'" .. DSN:gsub("'", "'\\''") .. "'"
  local cmd = "env -u LD_PRELOAD psql -X -q -v ON_ERROR_STOP=1 " .. q .. " -c \"" .. sql .. "\""
  assert(os.execute(cmd .. " >/dev/null 2>&1"), sql)
end

-- One sweep: next(0) on every subscription until it has nothing. Returns the
-- messages delivered, the seconds taken and the longest single call.
local function sweep(subs)
  local got, worst, t0 = 0, 0, now()
  for i = 1, #subs do
    local sub = subs[i]
    while true do
      local t = now()
      local ev, err, code = sub:next(0)
      t = now() - t
      if t > worst then
        worst = t
      end
      if not ev then
        assert(code == "ETIMEDOUT", err)
        break
      end
      if ev.kind == "message" then
        got = got + 1
      end
    end
  end
  return got, now() - t0, worst
end

-- Sweeps until a poll begins, then until a sweep runs no statement and
-- delivers nothing (subscriptions swept before the poll began in a sweep do
-- their part in the next one, sharing a read already made). Returns
-- a row: statements, sweeps, seconds, worst next, messages delivered, and
-- whether another poll began before the work was done.
local function measure(r, subs, limit)
  local deadline = now() + limit
  local polls = r:stats().polls
  while true do
    local q0 = r:stats().queries
    local got, secs, worst = sweep(subs)
    if r:stats().polls > polls then
      local row = { statements = r:stats().queries - q0, sweeps = 1, secs = secs, worst = worst, got = got }
      polls = r:stats().polls
      while true do
        local q1 = r:stats().queries
        got, secs, worst = sweep(subs)
        if r:stats().queries == q1 and got == 0 then
          break -- a sweep without a statement or a message: the poll's work is done
        end
        row.sweeps, row.secs, row.got = row.sweeps + 1, row.secs + secs, row.got + got
        row.worst = math.max(row.worst, worst)
        row.statements = r:stats().queries - q0
        if r:stats().polls > polls then
          row.overlapped = true
          break
        end
      end
      return row
    end
    assert(now() < deadline, "no backstop poll came")
  end
end

local function shape(chats, per, moved, interval)
  if DSN then
    psql("DROP SCHEMA IF EXISTS " .. SCHEMA .. " CASCADE")
  end
  local memdb = not DSN and chatstream.memory() or nil
  local w = open(memdb)
  assert(w:migrate())
  local ids = {}
  for i = 1, chats do
    ids[i] = assert(w:create_chat({ owner = "bench", title = "idle " .. i }))
  end
  local r = open(memdb, { poll_interval = interval, queue_size = 64 })
  local subs = {}
  for _, chat in ipairs(ids) do
    for _ = 1, per do
      subs[#subs + 1] = assert(r:subscribe(chat))
    end
  end
  sweep(subs) -- the snapshots' status events
  -- A sweep when nothing is due (the first may still meet a poll that came
  -- due while subscribing: take the quicker of two).
  local polls = r:stats().polls
  local _, idle = sweep(subs)
  local _, idle2 = sweep(subs)
  idle = math.min(idle, idle2)
  local rows = {}
  -- Wait for a poll first: one may have come due while subscribing.
  if r:stats().polls == polls then
    measure(r, subs, interval * 3)
  end
  rows[1] = measure(r, subs, interval * 3)
  rows[1].moved = 0
  if moved > 0 then
    local want = 0
    for i = 1, moved do
      local p = w:prepare(ids[(i - 1) * (chats // moved) + 1], { { role = "user", content = "silent " .. i } })
      assert(p:commit())
      p:close() -- neither cached nor notified: only the poll can find it
      want = want + per
    end
    rows[2] = measure(r, subs, interval * 3)
    rows[2].moved = moved
    assert(rows[2].got == want, ("the poll delivered %d of %d messages"):format(rows[2].got, want))
  end
  for _, s in ipairs(subs) do
    s:close()
  end
  r:close()
  w:close()
  if memdb then
    memdb:close()
  end
  return rows, idle
end

local function main()
  local o = { shapes = "1000x1,10000x1", moved = 10, interval = 10 }
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write("usage: pollbench.lua [--shapes CxS,...] [--moved M] [--interval SECONDS]\n")
      os.exit(2)
    end
    o[k] = k == "shapes" and arg[i + 1] or tonumber(arg[i + 1]) or error("bad --" .. k)
    i = i + 2
  end
  print(("backstop poll: C chats x S subscriptions, swept with next(0); poll_interval %g s; on %s"):format(o.interval,
    DSN and "PostgreSQL" or "the memory store"))
  print(("%-7s %-5s %-8s %-6s %11s %7s %9s %8s %14s %10s"):format("chats", "subs", "total", "moved", "statements",
    "sweeps", "poll ms", "idle ms", "worst next ms", "delivered"))
  for c, s in o.shapes:gmatch("(%d+)x(%d+)") do
    local chats, per = tonumber(c), tonumber(s)
    local rows, idle = shape(chats, per, math.min(math.tointeger(o.moved), chats), o.interval)
    for _, row in ipairs(rows) do
      print(("%-7d %-5d %-8d %-6d %11d %7d %9.1f %8.1f %14.2f %10d%s"):format(chats, per, chats * per, row.moved,
        row.statements, row.sweeps, row.secs * 1000, idle * 1000, row.worst * 1000, row.got,
        row.overlapped and "  (the next poll began meanwhile)" or ""))
    end
  end
end

main()
