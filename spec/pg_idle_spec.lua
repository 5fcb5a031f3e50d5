-- spec/pg_idle_spec.lua - an idle reader does not hurt the database. A store
-- subscribes and then makes no call for a while (an agent waiting on a model)
-- while another process's store writes megabytes of notifications: the
-- store's listener thread keeps draining its connection, so the listener's
-- server backend never waits to write (ClientWrite), holds no snapshot
-- (backend_xmin), and the cluster's notification queue does not grow. When
-- the reader wakes it gets every message once, in order, though its buffer
-- overflowed on the way (the overflow turns into a resync from W).
-- PostgreSQL only.
local H = require("helpers")
local chatstream = require("chatstream")

local function psql_rows(sql)
  local p = io.popen(("env -u LD_PRELOAD psql -X -tA -F '|' -v ON_ERROR_STOP=1 %q -c %q 2>&1"):format(H.dsn, sql))
  local out = p:read("a")
  assert(p:close(), "psql failed: " .. sql .. ": " .. out)
  return (out:gsub("%s+$", ""))
end

describe("an idle reader (PostgreSQL)", function()
  if not H.require_pg(_ENV) then
    return
  end

  it("is drained in the background: its backend never waits to write, the queue stays flat", function()
    H.with_instance("postgresql", function(inst)
      local writer = inst:open()
      local reader = inst:open()
      local chat = assert(writer:create_chat({ owner = "alice" }))
      local sub = assert(reader:subscribe(chat))
      assert.are.equal("status", sub:next(0).kind)
      local pid = reader:listener_pid()
      assert.is_truthy(pid)
      -- 3,000 messages of 2 KB, each notification carrying its message:
      -- about 6 MB, far more than the socket buffers between the backend and
      -- the store, and more than the store's own buffer (4 MiB)
      local body = string.rep("y", 2000)
      local want, states, usage_max = {}, {}, 0
      for i = 1, 3000 do
        want[i] = assert(writer:append(chat, { role = "user", content = body }))[1]
        if i % 500 == 0 then
          local row = psql_rows(("SELECT coalesce(wait_event, ''), backend_xmin IS NULL, "
            .. "pg_notification_queue_usage() FROM pg_stat_activity WHERE pid = %d"):format(pid))
          local wait, noxmin, usage = row:match("^([^|]*)|([tf])|([%d.e-]+)$")
          assert.is_truthy(wait, row)
          states[#states + 1] = wait
          assert.are.equal("t", noxmin, "the idle listener holds a snapshot: " .. row)
          usage_max = math.max(usage_max, tonumber(usage))
        end
      end
      chatstream.sleep(0.3)
      local row = psql_rows(("SELECT coalesce(wait_event, ''), state FROM pg_stat_activity WHERE pid = %d"):format(pid))
      states[#states + 1] = row:match("^([^|]*)")
      for _, w in ipairs(states) do
        assert.are_not.equal("ClientWrite", w, "the idle listener's backend: " .. table.concat(states, ", "))
      end
      -- the queue is emptied as fast as it fills: nothing waits on this reader
      assert.is_true(usage_max < 0.0001, "queue usage reached " .. usage_max)
      -- nobody read the 4 MiB buffer: the listener went deaf (its backend is
      -- no longer woken by every writer's commit) ...
      assert.are.equal(1, reader:stats().listener_deaf)
      local last = psql_rows(("SELECT query FROM pg_stat_activity WHERE pid = %d"):format(pid))
      assert.are.equal("UNLISTEN *", last)
      -- the reader wakes: every message once, in order
      local got, deadline = {}, os.time() + 30
      while #got < #want and os.time() <= deadline do
        local ev = sub:next(0.2)
        if ev and ev.kind == "message" then
          got[#got + 1] = ev.id
        end
      end
      assert.are.same(want, got)
      -- ... and hears again now that the reader is back
      last = psql_rows(("SELECT query FROM pg_stat_activity WHERE pid = %d"):format(pid))
      H.contains('LISTEN "' .. inst.schema .. ':chat:' .. chat .. '"', last)
      print(("\nidle reader: 3000 x 2 KB written; its backend's wait states %s; queue usage max %g; "
        .. "resyncs %d; delivered %d in order"):format(table.concat(states, ","), usage_max,
        reader:stats().resyncs, #got))
    end)
  end)
end)

describe("the notification queue in the open (PostgreSQL)", function()
  if not H.require_pg(_ENV) then
    return
  end

  it("stats() gives the queue usage and the server's warnings; a full queue is said so", function()
    H.with_instance("postgresql", function(inst)
      local s = inst:open({ poll_interval = 0.05 })
      local chat = assert(s:create_chat({ owner = "alice" }))
      local sub = assert(s:subscribe(chat))
      s:step(0.1)
      local st = s:stats()
      assert.are.equal("number", type(st.notify_queue_usage))
      assert.is_true(st.notify_queue_usage >= 0 and st.notify_queue_usage < 0.01)
      assert.are.equal(0, st.warnings)
      -- the server's warning (the one a filling queue sends to every notifier),
      -- injected at the store boundary: a trigger on the messages table
      local schema = inst.schema
      H.psql(("CREATE FUNCTION %s.warn() RETURNS trigger LANGUAGE plpgsql AS "
        .. "'BEGIN RAISE WARNING ''NOTIFY queue is 50%%%% full''; RETURN NEW; END'"):format(schema))
      H.psql(("CREATE TRIGGER warn BEFORE INSERT ON %s.messages FOR EACH ROW EXECUTE FUNCTION %s.warn()")
        :format(schema, schema))
      assert(s:append(chat, { role = "user", content = "x" }))
      st = s:stats()
      assert.are.equal(1, st.warnings)
      assert.are.equal("NOTIFY queue is 50% full", st.last_warning)
      -- a full queue: the append fails saying so, and nothing was written
      H.psql(("CREATE OR REPLACE FUNCTION %s.warn() RETURNS trigger LANGUAGE plpgsql AS "
        .. "'BEGIN RAISE EXCEPTION USING ERRCODE = ''54000'', "
        .. "MESSAGE = ''too many notifications in the NOTIFY queue''; END'"):format(schema))
      local r, err, code = s:append(chat, { role = "user", content = "y" })
      assert.is_nil(r)
      assert.are.equal("EBACKEND", code)
      H.contains("notification queue is full", err)
      H.contains("nothing was written", err)
      local got = {}
      for ev in sub:events(0.2) do
        if ev.kind == "message" then
          got[#got + 1] = ev.content
        end
      end
      assert.are.same({ "x" }, got)
    end)
  end)
end)
