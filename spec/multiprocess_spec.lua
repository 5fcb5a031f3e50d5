-- spec/multiprocess_spec.lua - stochastic races across OS processes, on PostgreSQL.
--
-- Writers run as separate processes (spec/support/writer.lua, spawned with
-- io.popen, on the same build and with the environment inherited as is), so
-- their caches are not the reader's, their notifications come through the
-- server, and the interleavings are the real ones, not replayed steps.
--   1. Concurrent writers: K writer processes and this process publish into
--      the same chats while readers of every strategy, on two stores (two
--      replicas) of this process, follow them. Compared with the database.
--   2. The seed's promote/resume shape, for CHATSTREAM_MP_ROUNDS rounds: a
--      promote process commits (tool, user) in one transaction; this process
--      commits the resumed worker's reply and publishes it at once, so its
--      cache holds the reply before the promoted messages are notified.
--      last_id must lose (proof that the spec hits the race); rescan and
--      watermark (plain and ordered) must deliver every message exactly once.
-- Each test prints a table to stderr: strategy, rounds, messages, lost, duplicated.
local H = require("helpers")

local HERE = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
local WRITER = HERE .. "support/writer.lua"

local function env_int(name, default)
  local v = math.tointeger(tonumber(os.getenv(name) or ""))
  return v and v > 0 and v or default
end

local ROUNDS = env_int("CHATSTREAM_MP_ROUNDS", 30)
local WRITERS = 3 -- K, test 1
local BATCHES = env_int("CHATSTREAM_MP_BATCHES", 40) -- per writer, test 1
-- The promote writer waits a delay (ms) after its commit before its first
-- notification, and a gap (ms) between its two (writer.lua promote); both are
-- drawn per round from these ranges. The delay leaves this process the time
-- to commit and publish the reply first, so the reply's notification comes
-- before the promote's (the seed's order); the gap decides whether the readers
-- merge the promote's two notifications one by one or together. (last_id
-- loses whatever the timing: its first merge always finds the reply alone in
-- this process's cache, delivers it and skips the DB.)
local PROMOTE_DELAY = { 10, 30 }
local PROMOTE_GAP = { 0, 10 }

-- ---- processes -----------------------------------------------------------------

local P = require("support.procs")
local shq, reap, exited, line_match = P.shq, P.reap, P.exited, P.line_match

--- Starts `lua5.4 writer.lua args...` in the background (support.procs).
local function spawn(procs, args)
  return P.spawn(procs, WRITER, args)
end

--- Reaps a writer that must have succeeded; returns the n of its "done n".
local function reap_ok(w)
  local out, err, status = reap(w)
  assert(status == 0, string.format("writer %s failed (status %s):\n%s\n%s",
    table.concat(w.args, " ", 1, 1), tostring(status), table.concat(out, "\n"), err))
  for _, l in ipairs(out) do
    local n = l:match("^done (%d+)$")
    if n then
      return math.tointeger(tonumber(n))
    end
  end
  error("writer printed no 'done' line:\n" .. table.concat(out, "\n"))
end

local with_writers = P.with

-- ---- readers ---------------------------------------------------------------------

local KINDS = {
  -- watermark delivering as found (ordered, its default, is the next row)
  { label = "watermark", strategy = "watermark", ordered = false },
  { label = "watermark ordered", strategy = "watermark", ordered = true },
  { label = "rescan", strategy = "rescan" },
  { label = "last_id", strategy = "last_id" },
}

--- Subscribes one reader of every kind to chat on store; appends them to readers.
local function subscribe_all(readers, store, store_name, chat)
  for _, k in ipairs(KINDS) do
    local sub = assert(store:subscribe(chat, { after = 0, strategy = k.strategy, ordered = k.ordered }))
    readers[#readers + 1] = { kind = k, store = store_name, chat = chat, sub = sub, got = {} }
  end
end

--- Drains every reader without blocking; returns how many messages came.
local function drain_all(readers)
  local n = 0
  for _, r in ipairs(readers) do
    for ev in r.sub:events(0) do
      if ev.kind == "message" then
        r.got[#r.got + 1] = ev.id
        n = n + 1
      end
    end
  end
  return n
end

--- Drains the readers until nothing has come for `idle` seconds (no event,
-- no notification on any store), at most `limit` seconds.
local function drain_until_idle(readers, stores, idle, limit)
  local tick = 0.05
  local deadline = os.time() + limit + 1
  local quiet = 0
  while quiet < idle do
    if drain_all(readers) > 0 then
      quiet = 0
    else
      local routed = 0
      for i, s in ipairs(stores) do
        routed = routed + assert(s:step(i == 1 and tick or 0))
      end
      quiet = routed > 0 and 0 or quiet + tick
    end
    if os.time() > deadline then
      error(string.format("the readers did not go idle within %d s", limit), 2)
    end
  end
end

--- The chat's message ids in the database, ascending (through psql).
local function db_ids(schema, chat)
  local sql = string.format("SELECT id FROM %s.messages WHERE chat_id = %d ORDER BY id", schema, chat)
  -- Not under the ASan preload of a sanitizer run: psql is not built for it.
  local f = assert(io.popen(string.format("env -u LD_PRELOAD psql -X -tA %s -c %s 2>&1", shq(H.dsn), shq(sql))))
  local s = f:read("a")
  local ok = f:close()
  assert(ok, "psql failed: " .. s)
  local ids = {}
  for l in s:gmatch("[^\n]+") do
    ids[#ids + 1] = math.tointeger(tonumber(l)) or error("psql: unexpected output: " .. l)
  end
  return ids
end

--- A table of totals per reader kind, in KINDS order.
local function new_totals()
  local t = {}
  for _, k in ipairs(KINDS) do
    t[k.label] = { rounds = 0, messages = 0, lost = 0, dups = 0, lossy_rounds = 0 }
  end
  return t
end

--- Checks a reader against the database truth; adds to totals; returns a
-- description of what is wrong, or nil. last_id's losses are only counted.
local function check_reader(r, want, totals)
  local lost, dups = H.check(r.got, want)
  local t = totals[r.kind.label]
  t.rounds = t.rounds + 1
  t.messages = t.messages + #want
  t.lost = t.lost + #lost
  t.dups = t.dups + #dups
  if #lost > 0 then
    t.lossy_rounds = t.lossy_rounds + 1
  end
  local wrong = {}
  if #dups > 0 then
    wrong[#wrong + 1] = "duplicated {" .. table.concat(dups, ", ") .. "}"
  end
  if r.kind.strategy ~= "last_id" then
    if #lost > 0 then
      wrong[#wrong + 1] = "lost {" .. table.concat(lost, ", ") .. "}"
    end
    if r.kind.ordered and #lost == 0 and #dups == 0 then
      for i = 1, #want do
        if r.got[i] ~= want[i] then
          wrong[#wrong + 1] = "out of order: got {" .. table.concat(r.got, ", ") .. "}"
          break
        end
      end
    end
    if r.kind.strategy == "watermark" and #lost == 0 and r.sub:cursor() ~= want[#want] then
      wrong[#wrong + 1] = string.format("cursor %d, expected %d", r.sub:cursor(), want[#want])
    end
  end
  if #wrong > 0 then
    local w = #want <= 20 and "{" .. table.concat(want, ", ") .. "}"
      or string.format("%d ids, %d..%d", #want, want[1], want[#want])
    return string.format("store %s, chat %d, %s: %s (want %s)", r.store, r.chat, r.kind.label,
      table.concat(wrong, "; "), w)
  end
end

local function print_table(title, first_col, totals)
  io.stderr:write("\n", title, "\n")
  io.stderr:write(string.format("  %-18s %8s %9s %6s %11s\n", "strategy", first_col, "messages", "lost", "duplicated"))
  for _, k in ipairs(KINDS) do
    local t = totals[k.label]
    io.stderr:write(string.format("  %-18s %8d %9d %6d %11d\n", k.label, t.rounds, t.messages, t.lost, t.dups))
  end
  local l = totals.last_id
  io.stderr:write(string.format("  (messages: what that strategy's readers had to get, summed; "
    .. "last_id lost some in %d of %d)\n", l.lossy_rounds, l.rounds))
end

local function msg(role, content)
  return { role = role, content = content }
end

-- ---- the specs -----------------------------------------------------------------------

describe("multiprocess races on postgresql", function()
  if not H.require_pg(_ENV) then
    return
  end

  it("concurrent writer processes: every reader but last_id gets every message once", function()
    H.with_instance("postgresql", function(inst)
      with_writers(function(procs)
        local a, b = inst:open(), inst:open() -- two replicas in this process
        local chats = {}
        local own = 0 -- messages this process appended
        for i = 1, 2 do
          chats[i] = a:create_chat({ owner = "alice", title = "mp " .. i })
          a:append(chats[i], { msg("user", "hello " .. i), msg("assistant", "hi " .. i) })
          own = own + 2
        end
        local readers = {}
        for _, chat in ipairs(chats) do
          subscribe_all(readers, a, "A", chat)
          subscribe_all(readers, b, "B", chat)
        end
        local seed0 = math.random(1, 1e6)
        local writers = {}
        for k = 1, WRITERS do
          writers[k] = spawn(procs, { "random", H.dsn, inst.schema, table.concat(chats, ","), BATCHES, seed0 + k, 3 })
        end

        -- Read while the writers run, and publish too: some at once, some
        -- committed now and published a few loops later (a slow publisher).
        local held = {} -- {p = publish, due = loop}
        local loop = 0
        local deadline = os.time() + 30
        local function all_exited()
          for _, w in ipairs(writers) do
            if not exited(w) then
              return false
            end
          end
          return true
        end
        while not all_exited() do
          assert(os.time() <= deadline, "the writers did not finish within 30 s")
          loop = loop + 1
          drain_all(readers)
          if math.random(8) == 1 then
            local chat = chats[math.random(#chats)]
            local m = { msg("assistant", "own " .. loop) }
            if math.random(2) == 1 then
              assert(a:append(chat, m))
            else
              local p = assert(a:prepare(chat, m))
              assert(p:commit())
              held[#held + 1] = { p = p, due = loop + math.random(1, 6) }
            end
            own = own + 1
          end
          for i = #held, 1, -1 do
            if held[i].due <= loop then
              assert(held[i].p:publish())
              held[i].p:close()
              table.remove(held, i)
            end
          end
          assert(a:step(0.002))
        end
        local written = 0
        for _, w in ipairs(writers) do
          written = written + reap_ok(w)
        end
        for _, h in ipairs(held) do
          assert(h.p:publish())
          h.p:close()
        end
        for _, chat in ipairs(chats) do
          assert(a:append(chat, msg("user", "the last word")))
          own = own + 1
        end
        drain_until_idle(readers, { a, b }, 0.3, 20)

        local totals, wrong, total = new_totals(), {}, 0
        for _, chat in ipairs(chats) do
          local want = db_ids(inst.schema, chat)
          total = total + #want
          -- A fresh subscription's snapshot agrees with the database.
          local fresh = inst:open()
          local snap = assert(fresh:subscribe(chat, { after = 0 }))
          assert.are.same(want, H.drain(snap))
          snap:close()
          for _, r in ipairs(readers) do
            if r.chat == chat then
              wrong[#wrong + 1] = check_reader(r, want, totals)
            end
          end
        end
        for _, r in ipairs(readers) do
          r.sub:close()
        end
        print_table(string.format("multiprocess concurrent writers: %d writer processes + this one, %d messages "
          .. "in %d chats, readers on 2 stores", WRITERS, total, #chats), "readers", totals)
        assert.are.equal(written + own, total) -- every "done n" is in the database
        assert(#wrong == 0, "readers got it wrong:\n" .. table.concat(wrong, "\n"))
      end)
    end)
  end)

  it("promote/resume across processes: last_id loses, rescan and watermark never do", function()
    H.with_instance("postgresql", function(inst)
      with_writers(function(procs)
        local a = inst:open() -- this process: the readers and the resumed worker
        local totals, wrong = new_totals(), {}
        for round = 1, ROUNDS do
          local chat = a:create_chat({ owner = "alice", title = "promote " .. round })
          local history = a:append(chat, {
            msg("user", "run the tool"),
            msg("assistant", '{"tool_call":"client_tool"}'),
          })
          local readers = {}
          subscribe_all(readers, a, "A", chat)
          local base = a:stats().notifications
          local delay = math.random(PROMOTE_DELAY[1], PROMOTE_DELAY[2])
          local gap = math.random(PROMOTE_GAP[1], PROMOTE_GAP[2])
          local w = spawn(procs, { "promote", H.dsn, inst.schema, chat, delay, gap })

          -- As soon as the promote has committed, the resumed worker (here)
          -- commits its reply and publishes it at once.
          local deadline = os.time() + 10
          local p1, p2
          repeat
            p1, p2 = line_match(w, "^committed (%d+) (%d+)$")
            if not p1 then
              assert(not exited(w), "the promote writer ended without committing: " .. P.slurp(w.err))
              assert(os.time() <= deadline, "the promote writer did not commit within 10 s")
              assert(a:step(0.001))
            end
          until p1
          p1, p2 = math.tointeger(tonumber(p1)), math.tointeger(tonumber(p2))
          local reply = assert(a:prepare(chat, msg("assistant", "the resumed reply")))
          local rid = assert(reply:commit())[1]
          assert(reply:publish())
          reply:close()
          assert.is_true(history[2] < p1 and p1 < p2 and p2 < rid)

          -- Read while the promote process publishes slowly.
          while not exited(w) do
            assert(os.time() <= deadline, "the promote writer did not finish within 10 s")
            drain_all(readers)
            assert(a:step(0.002))
          end
          reap_ok(w)
          H.settle(a, base + 3) -- the reply's notification and the promote's two
          drain_until_idle(readers, { a }, 0.2, 10)

          local want = db_ids(inst.schema, chat)
          assert.are.same({ history[1], history[2], p1, p2, rid }, want)
          for _, r in ipairs(readers) do
            wrong[#wrong + 1] = check_reader(r, want, totals)
            r.sub:close()
          end
        end
        print_table(string.format("multiprocess promote/resume: %d rounds", ROUNDS), "rounds", totals)
        assert(#wrong == 0, "readers got it wrong:\n" .. table.concat(wrong, "\n"))
        -- Proof that the spec hits the race: the pre-fix algorithm loses.
        assert.is_true(totals.last_id.lost > 0, "last_id lost nothing: the spec did not hit the race")
      end)
    end)
  end)
end)
