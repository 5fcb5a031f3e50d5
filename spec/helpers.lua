-- spec/helpers.lua - shared helpers for the busted specs, and the store matrix.
--
-- The matrix: every spec that is about a store runs once per backend.
--   memory      always
--   postgresql  on the server of CHATSTREAM_TEST_DSN (make test starts one:
--               scripts/pg-test-server). Missing in CI (CI set): a failure.
--               Missing elsewhere: the specs are pending, saying how to get one.
local chatstream = require("chatstream")
local luassert = require("luassert")

local H = {}

H.strategies = { "last_id", "rescan", "watermark" }

H.dsn = os.getenv("CHATSTREAM_TEST_DSN")
if H.dsn == "" then
  H.dsn = nil
end
H.ci = os.getenv("CI") ~= nil and os.getenv("CI") ~= ""
H.pg_missing = "no PostgreSQL for the specs: run `make test`, or start one with "
  .. "`scripts/pg-test-server start && eval \"$(scripts/pg-test-server env)\"`"

--- Drains a subscription (non-blocking) and returns the message ids got.
function H.drain(sub, into, timeout)
  into = into or {}
  for ev in sub:events(timeout or 0) do
    if ev.kind == "message" then
      into[#into + 1] = ev.id
    end
  end
  return into
end

--- What a reader shows, built from its events as a page builds it: a
-- message goes at the end (one it shows already is counted in v.twice, not
-- shown again), a truncate (an edit) drops what is above its after. v =
-- H.view(), then H.view_take(v, ev) for each event: v.ids (in arrival
-- order), v.shown[id], v.twice, v.truncates.
function H.view()
  return { ids = {}, shown = {}, twice = {}, truncates = 0 }
end

function H.view_take(v, ev)
  if ev.kind == "message" then
    if v.shown[ev.id] then
      v.twice[#v.twice + 1] = ev.id
      return
    end
    v.shown[ev.id] = true
    v.ids[#v.ids + 1] = ev.id
  elseif ev.kind == "truncate" then
    local keep = {}
    for _, id in ipairs(v.ids) do
      if id <= ev.after then
        keep[#keep + 1] = id
      else
        v.shown[id] = nil
      end
    end
    v.ids = keep
    v.truncates = v.truncates + 1
  end
end

--- The status event a subscription's snapshot begins with: the chat's status
-- and version (a new chat is "waiting", version 0).
function H.status_event(chat_id, status, version)
  return { kind = "status", chat_id = chat_id, status = status or "waiting", version = version or 0 }
end

--- The next message event of sub: sub:next(timeout), skipping the other
-- kinds (the snapshot's status and queue events; live status, queue and part
-- events) as H.drain does. Returns what sub:next returns when nothing comes
-- (nil, "timeout", "ETIMEDOUT" or nil, err, code). Each skipped event restarts the wait.
function H.next_message(sub, timeout)
  while true do
    local ev, err, code = sub:next(timeout)
    if ev == nil then
      return nil, err, code
    end
    if ev.kind == "message" then
      return ev
    end
  end
end

--- Checks that the list of events `evs` begins with the snapshot's status
-- event of a new chat (H.status_event(chat_id), exactly, first) and returns
-- the events after it. A failed assertion otherwise.
function H.after_status(evs, chat_id)
  luassert.are.same(H.status_event(chat_id), evs[1], "the snapshot's first event")
  return { table.unpack(evs, 2) }
end

--- Returns the error message of f(...), which must raise.
function H.raises(f, ...)
  local ok, err = pcall(f, ...)
  if ok then
    error("expected an error", 2)
  end
  return tostring(err)
end

--- Raises unless msg contains the plain text `want`.
function H.contains(want, msg)
  if not string.find(msg, want, 1, true) then
    error(("%q not found in %q"):format(want, msg), 2)
  end
end

--- Compares what a reader got with the chat's ids (ascending list `want`).
-- Returns lost (ids never got), dups (ids got more than once).
function H.check(got, want)
  local seen, lost, dups = {}, {}, {}
  for _, id in ipairs(got) do
    if seen[id] then
      dups[#dups + 1] = id
    end
    seen[id] = true
  end
  for _, id in ipairs(want) do
    if not seen[id] then
      lost[#lost + 1] = id
    end
  end
  return lost, dups
end

-- ---- backends -------------------------------------------------------------

local schema_seq = 0

--- A fresh, empty database on the backend: a memory database, or a new
-- PostgreSQL schema (migrated; ids start at 1). Returns an instance:
--   inst:open(opts)   a store (a replica) on it; opts as chatstream.open's
--   inst.memdb        the memory database (memory only: fault knobs)
--   inst:close()      closes every store it opened
local function new_instance(kind)
  local inst = { kind = kind, stores = {} }
  if kind == "memory" then
    inst.memdb = chatstream.memory()
  else
    schema_seq = schema_seq + 1
    -- unique per process and call, so parallel runs and reruns never meet
    inst.schema = string.format("t%d_%d_%d", os.time() % 100000, math.random(1, 1e6), schema_seq)
  end
  function inst.open(self, opts)
    local o = {}
    for k, v in pairs(opts or {}) do
      o[k] = v
    end
    if self.kind == "memory" then
      o.memory = self.memdb
    else
      o.dsn, o.schema = H.dsn, self.schema
      if o.poll_interval == nil then
        o.poll_interval = 0 -- deterministic specs: no backstop poll
      end
    end
    local store = assert(chatstream.open(o))
    self.stores[#self.stores + 1] = store
    return store
  end
  function inst.close(self)
    for _, s in ipairs(self.stores) do
      s:close()
    end
    self.stores = {}
    if self.kind == "postgresql" then
      H.psql("DROP SCHEMA IF EXISTS " .. self.schema .. " CASCADE")
    end
  end
  if kind == "postgresql" then
    local s = inst:open()
    assert(s:migrate())
  end
  return inst
end

H.backends = {
  { name = "memory" },
  { name = "postgresql" },
}

--- Inside a describe: true when PostgreSQL is there; otherwise declares the
-- failing test (in CI) or the pending one (elsewhere) and returns false.
-- busted's it/pending live in the spec file's environment: pass it.
function H.require_pg(env)
  if H.dsn then
    return true
  end
  if H.ci then
    env.it("has a PostgreSQL server (CHATSTREAM_TEST_DSN)", function()
      error(H.pg_missing)
    end)
  else
    env.pending(H.pg_missing)
  end
  return false
end

--- Runs body(backend) inside a describe per backend. A backend that is not
-- available fails (in CI) or is pending (elsewhere), never silently skipped.
function H.each_backend(env, body)
  for _, b in ipairs(H.backends) do
    env.describe("on " .. b.name, function()
      if b.name == "memory" or H.require_pg(env) then
        body(b.name)
      end
    end)
  end
end

H.new_instance = new_instance

--- Runs SQL on the test server through psql (test set-up only).
function H.psql(sql)
  -- Not under the ASan preload of a sanitizer run: psql is not built for it.
  local cmd = string.format("env -u LD_PRELOAD psql -X -q -v ON_ERROR_STOP=1 %q -c %q >/dev/null 2>&1", H.dsn, sql)
  local ok = os.execute(cmd)
  assert(ok, "psql failed: " .. sql)
end

--- Waits until the store's hub has received n notifications in all (as
-- store:stats() counts them, malformed ones included), at most `limit`
-- seconds. On PostgreSQL notifications arrive asynchronously: this is the
-- barrier that makes stepped interleavings deterministic there.
function H.settle(store, n, limit)
  local deadline = os.time() + (limit or 10) + 1
  while true do
    local st = store:stats()
    if st.notifications + st.malformed >= n then
      return st
    end
    if os.time() > deadline then
      error(string.format("only %d of %d notifications arrived", st.notifications + st.malformed, n), 2)
    end
    store:step(0.05)
  end
end

--- Runs fn(inst) on a fresh instance and closes it, even on error.
function H.with_instance(kind, fn)
  local inst = new_instance(kind)
  local ok, err = pcall(fn, inst)
  inst:close()
  if not ok then
    error(err, 0)
  end
end

return H
