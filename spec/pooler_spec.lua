-- spec/pooler_spec.lua - the PostgreSQL store behind a connection pooler: a
-- real PgBouncer in front of the test server, on a free loopback port, with
-- one pool per case:
--   tx1, tx2  transaction mode (1 and 2 server connections): refused at open,
--             nothing written
--   shared    session mode, 2 server connections, no reset query, the oldest
--             idle connection first: stores of two schemas take turns on one
--             server session, and each writes only its own schema
--   session   session mode: messages and parts arrive live
-- PostgreSQL only (CHATSTREAM_TEST_DSN, a trust-auth server as
-- scripts/pg-test-server runs). Needs pgbouncer: missing in CI (CI set), a
-- failure; elsewhere, pending.
local H = require("helpers")
local chatstream = require("chatstream")
local P = require("support.procs")

local pgbouncer_missing = "no pgbouncer for the pooler specs: `apt-get install pgbouncer` (or scripts/bootstrap)"

-- ---- local helpers -----------------------------------------------------------

local shq = P.shq

-- Runs a shell command (never under the ASan preload of a sanitizer run);
-- returns its success and its output.
local function sh(cmd)
  local p = io.popen("env -u LD_PRELOAD sh -c " .. shq(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return ok == true, (out:gsub("%s+$", ""))
end

-- psql on `dsn` (unaligned, tuples only, fields split by "|"): the output.
local function psql_on(dsn, sql)
  local ok, out = sh("psql -X -tA -F '|' -v ON_ERROR_STOP=1 " .. shq(dsn) .. " -c " .. shq(sql))
  assert(ok, "psql failed: " .. sql .. ": " .. out)
  return out
end

local function psql_value(sql)
  return psql_on(H.dsn, sql)
end

local function sleep(s)
  os.execute(string.format("env -u LD_PRELOAD sleep %.3f", s))
end

local function pgbouncer_path()
  local ok, out = sh("command -v pgbouncer || ls /usr/sbin/pgbouncer")
  return ok and out ~= "" and out:match("[^\n]+") or nil
end

local function free_port()
  local ok, out = sh([[python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])']])
  return ok and tonumber(out) or math.random(20000, 40000)
end

-- A PgBouncer in front of the test server (run as `postgres` when we are
-- root: it refuses to run as root). bouncer:dsn(pool) is the DSN of a pool;
-- bouncer:stop() ends it and removes its directory.
local function start_bouncer(exe)
  local host, port, db, user = psql_value(
    "SELECT coalesce(host(inet_server_addr()), current_setting('unix_socket_directories')), "
      .. "inet_server_port(), current_database(), current_user"
  ):match("^([^|]*)|([^|]*)|([^|]*)|([^|]*)$")
  assert(host, "cannot tell the test server's address")
  host = host:match("^[^,]+") -- the first socket directory, if a socket
  local _, uid = sh("id -u")
  local _, dir = sh("mktemp -d /tmp/chatstream-pgb.XXXXXX")
  local b = { dir = dir, user = user, port = free_port() }
  local server = string.format("host=%s port=%s dbname=%s", host, port, db)
  local ini = table.concat({
    "[databases]",
    "tx1 = " .. server .. " pool_mode=transaction pool_size=1",
    "tx2 = " .. server .. " pool_mode=transaction pool_size=2",
    "shared = " .. server .. " pool_mode=session pool_size=2",
    "session = " .. server .. " pool_mode=session pool_size=8",
    "[pgbouncer]",
    "listen_addr = 127.0.0.1",
    "listen_port = " .. b.port,
    "unix_socket_dir =",
    "auth_type = trust",
    "auth_file = " .. dir .. "/users.txt",
    "pool_mode = session",
    -- server sessions go back to the pool as they are (no DISCARD ALL) ...
    "server_reset_query =",
    -- ... and are handed out in turn (tx2 relies on it)
    "server_round_robin = 1",
    "max_client_conn = 100",
    "logfile = " .. dir .. "/pgbouncer.log",
    "pidfile = " .. dir .. "/pgbouncer.pid",
  }, "\n") .. "\n"
  local f = assert(io.open(dir .. "/pgbouncer.ini", "w"))
  f:write(ini)
  f:close()
  f = assert(io.open(dir .. "/users.txt", "w"))
  f:write(string.format('"%s" ""\n', user))
  f:close()
  local as = ""
  if uid == "0" then
    assert(sh("chown -R postgres: " .. shq(dir)))
    as = "runuser -u postgres -- "
  end
  -- It forks into the background; its start-up errors go to a file, not to
  -- a pipe the daemon would hold open.
  local out = dir .. "/start.out"
  local ok = sh(as .. shq(exe) .. " -d -q " .. shq(dir .. "/pgbouncer.ini") .. " >" .. shq(out) .. " 2>&1 </dev/null")
  assert(ok, "pgbouncer did not start: " .. P.slurp(out))
  function b.dsn(_, pool)
    return string.format("postgresql://%s@127.0.0.1:%d/%s?connect_timeout=2", user, b.port, pool)
  end
  function b.log()
    return P.slurp(dir .. "/pgbouncer.log")
  end
  function b.stop()
    local pf = io.open(dir .. "/pgbouncer.pid")
    local pid = pf and pf:read("l")
    if pf then
      pf:close()
    end
    if pid and pid:match("^%d+$") then
      sh("kill " .. pid)
      for _ = 1, 100 do
        if not sh("kill -0 " .. pid) then
          break
        end
        sleep(0.05)
      end
    end
    sh("rm -rf " .. shq(dir))
  end
  -- Ready when a pool answers.
  local up = false
  for _ = 1, 100 do
    if sh("psql -X -tA " .. shq(b:dsn("session")) .. " -c 'SELECT 1'") then
      up = true
      break
    end
    sleep(0.05)
  end
  if not up then
    local log = b.log()
    b.stop()
    error("pgbouncer does not answer: " .. log)
  end
  return b
end

-- Events of sub until pred(ev) holds, each waited for up to `limit` s
-- (poll_interval = 0: nothing comes but by notification). An error naming
-- what came instead otherwise.
local function await(sub, pred, limit, what)
  local seen = {}
  while true do
    local ev, err = sub:next(limit)
    if not ev then
      error(string.format("%s did not arrive within %s s (%s; got %s)", what, limit, err, table.concat(seen, ", ")), 2)
    end
    seen[#seen + 1] = ev.kind .. ":" .. tostring(ev.id or ev.text)
    if pred(ev) then
      return ev
    end
  end
end

local function schema_exists(schema)
  return psql_value("SELECT count(*) FROM pg_namespace WHERE nspname = '" .. schema .. "'") ~= "0"
end

-- The server sessions of a pool, seen through the pooler (each new client
-- gets the session idle the longest): pid -> {prepared = {name = text},
-- channels = {...}}. `n` sessions expected.
local function sessions_of(bouncer, pool, n)
  local by_pid, count = {}, 0
  for _ = 1, 4 * n do
    local out = psql_on(
      bouncer:dsn(pool),
      "SELECT pg_backend_pid(), 'p', name, statement FROM pg_prepared_statements "
        .. "UNION ALL SELECT pg_backend_pid(), 'l', c, '' FROM pg_listening_channels() c "
        .. "UNION ALL SELECT pg_backend_pid(), 's', '', ''"
    )
    for line in out:gmatch("[^\n]+") do
      local pid, kind, name, text = line:match("^(%d+)|(%a)|([^|]*)|(.*)$")
      assert(pid, "bad line: " .. line)
      if not by_pid[pid] then
        by_pid[pid] = { prepared = {}, channels = {} }
        count = count + 1
      end
      if kind == "p" then
        by_pid[pid].prepared[name] = text
      elseif kind == "l" then
        table.insert(by_pid[pid].channels, name)
      end
    end
    if count >= n then
      break
    end
  end
  return by_pid, count
end

-- ---- the specs ---------------------------------------------------------------

describe("the PostgreSQL store behind a pooler", function()
  if not H.require_pg(_ENV) then
    return
  end
  local exe = pgbouncer_path()
  if not exe then
    if H.ci then
      it("has pgbouncer", function()
        error(pgbouncer_missing)
      end)
    else
      pending(pgbouncer_missing)
    end
    return
  end

  local bouncer
  lazy_setup(function()
    bouncer = start_bouncer(exe)
  end)
  lazy_teardown(function()
    if bouncer then
      bouncer.stop()
    end
  end)

  local function open_via(pool, schema)
    return chatstream.open({ dsn = bouncer:dsn(pool), schema = schema, poll_interval = 0 })
  end

  describe("in transaction mode", function()
    local function refused(pool, cause)
      local schema = string.format("tpool_%d_%d", os.time() % 100000, math.random(1, 1e6))
      local store, err, code = open_via(pool, schema)
      if store then
        store:close()
      end
      assert.is_nil(store, "open through a pooler in transaction mode")
      assert.are.equal("EBACKEND", code)
      H.contains("EBACKEND: notifications do not reach the listener (a pooler in transaction mode?)", err)
      H.contains(cause, err)
      H.contains("connect directly or through a pooler in session mode", err)
      assert.is_false(schema_exists(schema), "nothing was written")
    end

    it("is refused at open when the listener's LISTEN and the NOTIFY run on one server session", function()
      refused("tx1", "the query connection and the listener ran on one server process")
    end)

    it("is refused at open when the probe notification never reaches the listener", function()
      -- Two server sessions in the pool, both idle: the listener's LISTEN
      -- takes one, the query connection's NOTIFY the other, and the session
      -- that listens went back to the pool with its transaction.
      local hold = "psql -X -q " .. shq(bouncer:dsn("tx2")) .. " -c 'SELECT pg_sleep(0.3)'"
      assert(sh("(" .. hold .. " & " .. hold .. " & wait)"))
      refused("tx2", "a probe notification did not arrive within 2 s")
    end)
  end)

  describe("in session mode", function()
    it("gives stores of two schemas one server session in turn: each runs its own statements, "
      .. "zero rows in the wrong schema", function()
      local a, b = H.new_instance("postgresql"), H.new_instance("postgresql")
      local ok, err = pcall(function()
        -- One store after the other on the pool of two server sessions,
        -- each keeping what the last store left on it (its prepared
        -- statements). A store's query connection gets the session that the
        -- last store's query connection or listener had (which one is the
        -- pooler's choice): in the order A A B B A, either way a store of B
        -- runs on a session where A's statements are, and a store of A on
        -- one where its own schema's already are, next to B's.
        for round, inst in ipairs({ a, a, b, b, a }) do
          local who = inst.schema .. " store " .. round
          local store = assert(open_via("shared", inst.schema))
          local chat = assert(store:create_chat({ owner = "alice", title = who }))
          local sub = assert(store:subscribe(chat)) -- its snapshot: a prepared read
          for i = 1, 2 do
            local content = inst.schema .. ":" .. round .. ":" .. i
            local ids, aerr = store:append(chat, { role = "user", content = content }) -- prepared
            assert(ids, who .. ": " .. tostring(aerr))
            local ev = await(sub, function(e)
              return e.kind == "message"
            end, 2, who .. " message " .. i)
            assert.are.equal(ids[1], ev.id)
            assert.are.equal(content, ev.content)
          end
          local later = assert(store:subscribe(chat)) -- the prepared read, run again
          local got = H.drain(later)
          assert.are.equal(2, #got, who)
          later:close()
          sub:close()
          store:close()
        end
        -- Each schema holds its own rows (2 per store), and none of the
        -- other's.
        for inst, n in pairs({ [a] = 6, [b] = 4 }) do
          local s = inst.schema
          assert.are.equal(tostring(n), psql_value("SELECT count(*) FROM " .. s .. ".messages"), s)
          assert.are.equal("0", psql_value("SELECT count(*) FROM " .. s .. ".messages WHERE NOT starts_with(content, '"
            .. s .. ":')"), s .. ": rows of the other schema")
        end
        -- The precondition: one server session ran the statements of both
        -- schemas, under distinct names (no reset between the stores). And
        -- neither the probe's channels nor the chats' were left listening.
        local by_pid, count = sessions_of(bouncer, "shared", 2)
        assert.are.equal(2, count, "server sessions of the pool")
        local both = 0
        for pid, sess in pairs(by_pid) do
          assert.are.same({}, sess.channels, "channels still listened on server process " .. pid)
          local kinds = { [a.schema] = {}, [b.schema] = {} }
          for name, text in pairs(sess.prepared) do
            local kind = name:match("^(cs_[a-z_]-)_%x+$")
            assert(kind and #name == #kind + 17, "a prepared name with its hash: " .. name)
            for schema, k in pairs(kinds) do
              if text:find(" " .. schema .. ".chats", 1, true) then
                assert.is_nil(k[kind], "two " .. kind .. " statements of " .. schema)
                k[kind] = name
              end
            end
          end
          if kinds[a.schema].cs_snapshot and kinds[b.schema].cs_snapshot then
            both = both + 1
            for _, kind in ipairs({ "cs_snapshot", "cs_append_body" }) do
              assert.is_string(kinds[a.schema][kind], kind .. " of " .. a.schema)
              assert.is_string(kinds[b.schema][kind], kind .. " of " .. b.schema)
              assert.are_not.equal(kinds[a.schema][kind], kinds[b.schema][kind])
            end
          end
        end
        assert.is_true(both >= 1, "no server session ran the statements of both schemas")
      end)
      a:close()
      b:close()
      if not ok then
        error(err, 0)
      end
    end)

    it("delivers messages and parts live (no backstop poll), also after the listener's server process is killed",
      function()
        H.with_instance("postgresql", function(inst)
          local writer = assert(open_via("session", inst.schema))
          local reader = assert(open_via("session", inst.schema))
          local chat = assert(writer:create_chat({ owner = "alice", title = "live" }))
          local sub = assert(reader:subscribe(chat))
          H.drain(sub) -- the snapshot: the status only
          local function round(tag)
            assert(writer:publish_part(chat, tag .. " part"))
            local part = await(sub, function(e)
              return e.kind == "part"
            end, 2, tag .. " part")
            assert.are.equal(tag .. " part", part.text)
            local ids = assert(writer:append(chat, { role = "assistant", content = tag }))
            local msg = await(sub, function(e)
              return e.kind == "message"
            end, 2, tag .. " message")
            assert.are.same({ ids[1], tag }, { msg.id, msg.content })
          end
          round("first")
          round("second")
          -- listener_pid() is the listener's server process (not the
          -- pooler's start-up key): a live backend of the server, whose end
          -- the pooler passes on to the listener, which reconnects.
          local pid = reader:listener_pid()
          assert.is_number(pid)
          assert.are.equal("1", psql_value("SELECT count(*) FROM pg_stat_activity WHERE pid = " .. pid))
          assert.are.equal("t", psql_value("SELECT pg_terminate_backend(" .. pid .. ")"))
          local ids = assert(writer:append(chat, { role = "assistant", content = "after the kill" }))
          local msg = await(sub, function(e)
            return e.kind == "message"
          end, 5, "the message after the kill")
          assert.are.equal(ids[1], msg.id)
          round("third")
          local pid2 = reader:listener_pid()
          assert.is_number(pid2)
          assert.are_not.equal(pid, pid2)
          assert.are.equal("1", psql_value("SELECT count(*) FROM pg_stat_activity WHERE pid = " .. pid2))
          local st = reader:stats()
          assert.are.equal(1, st.reconnects)
          assert.are.equal(0, st.malformed) -- the probe's notification never reached the hub
          -- 3 parts and 3 messages at least (the one after the kill may
          -- have come from the reconnect's resync)
          assert.is_true(st.notifications >= 6, st.notifications .. " notifications")
          sub:close()
        end)
      end)
  end)

  describe("on a direct connection", function()
    it("consumes the probe at open: no notification reaches the hub, none counted malformed", function()
      H.with_instance("postgresql", function(inst)
        local store = inst:open()
        for _ = 1, 3 do
          store:step(0.05)
        end
        local st = store:stats()
        assert.are.same({ 0, 0 }, { st.notifications, st.malformed })
        local pid = store:listener_pid()
        assert.are.equal("1", psql_value("SELECT count(*) FROM pg_stat_activity WHERE pid = " .. pid))
        local chat = assert(store:create_chat({ owner = "alice" }))
        local sub = assert(store:subscribe(chat))
        H.drain(sub)
        assert(store:append(chat, { role = "user", content = "hi" }))
        await(sub, function(e)
          return e.kind == "message"
        end, 2, "the message")
        st = store:stats()
        assert.are.same({ 1, 0 }, { st.notifications, st.malformed })
        sub:close()
      end)
    end)
  end)
end)
