-- spec/pg_unknown_spec.lua - writes whose answer is lost, on a real PostgreSQL
-- through a real TCP proxy (build/faultproxy): the reply of a COMMIT cut after
-- the server committed, a network stall, a synchronous commit that waits on a
-- standby that does not exist. The call says the outcome is unknown (or
-- reports the late success), never "rolled back"; a retry with the same
-- idempotency key returns the first call's ids, and the chat holds one row.
-- PostgreSQL only.
local H = require("helpers")
local FP = require("support.faultproxy")
local chatstream = require("chatstream")

local function psql_value(sql)
  local p = io.popen(("env -u LD_PRELOAD psql -X -tA -v ON_ERROR_STOP=1 %q -c %q 2>&1"):format(H.dsn, sql))
  local out = p:read("a")
  assert(p:close(), "psql failed: " .. sql .. ": " .. out)
  return (out:gsub("%s+$", ""))
end

local function count(inst, what, where)
  return tonumber(psql_value(("SELECT count(*) FROM %s.%s WHERE %s"):format(inst.schema, what, where)))
end

local function host_port(dsn)
  local host, port = dsn:match("@([%d%.]+):(%d+)/")
  return host, tonumber(port)
end

local report = {}

describe("writes whose answer is lost (PostgreSQL)", function()
  if not H.require_pg(_ENV) then
    return
  end
  local proxy
  before_each(function()
    local host, port = host_port(H.dsn)
    proxy = FP.start(host, port, { cut_match = "COMMIT", keep_log = true })
  end)
  after_each(function()
    proxy:stop()
  end)

  -- A store through the proxy, another one direct (a reader elsewhere).
  local function stores(inst, opts)
    local o = { dsn = proxy:dsn(H.dsn), schema = inst.schema, poll_interval = 0 }
    for k, v in pairs(opts or {}) do
      o[k] = v
    end
    local s = assert(chatstream.open(o))
    inst.stores[#inst.stores + 1] = s
    return s, inst:open()
  end

  for _, n in ipairs({ 1, 2 }) do
    local title = "append of %d message(s): the COMMIT's reply is cut; EUNKNOWN; the retry returns the ids, one row"
    it(title:format(n), function()
      H.with_instance("postgresql", function(inst)
        local w, r = stores(inst)
        local chat = assert(w:create_chat({ owner = "alice" }))
        local sub = assert(r:subscribe(chat))
        local msgs = {}
        for i = 1, n do
          msgs[i] = { role = "user", content = "m" .. i }
        end
        proxy:cut()
        local ids, err, code = w:append(chat, msgs, { idempotency_key = "req-1" })
        assert.is_nil(ids, "the cut did not hit: " .. proxy:log_text())
        assert.are.equal("EUNKNOWN", code, err)
        H.contains("may have committed", err)
        assert.are.equal(n, count(inst, "messages", "chat_id = " .. chat)) -- it did commit
        local again = assert(w:append(chat, msgs, { idempotency_key = "req-1" }))
        assert.are.equal(n, #again)
        assert.are.equal(n, count(inst, "messages", "chat_id = " .. chat))
        local got, deadline = {}, os.time() + 5
        while #got < n and os.time() <= deadline do
          H.drain(sub, got, 0.05)
        end
        H.drain(sub, got, 0.3)
        assert.are.same(again, got) -- the reader elsewhere: each once
        report[#report + 1] = ("append x%d: 1 retry, %d row(s), reader got %d"):format(n, n, #got)
      end)
    end)
  end

  it("create_chat and send: the COMMIT's reply is cut; the retry returns the same chat and id", function()
    H.with_instance("postgresql", function(inst)
      local w = stores(inst)
      proxy:cut()
      local chat, _, code = w:create_chat({ owner = "alice", idempotency_key = "new-chat" })
      assert.is_nil(chat)
      assert.are.equal("EUNKNOWN", code)
      chat = assert(w:create_chat({ owner = "alice", idempotency_key = "new-chat" }))
      assert.are.equal(1, count(inst, "chats", "owner = 'alice'"))
      proxy:cut()
      local id
      id, _, code = w:send(chat, { content = "hello", idempotency_key = "send-1" })
      assert.is_nil(id)
      assert.are.equal("EUNKNOWN", code)
      local id2, queued = assert(w:send(chat, { content = "hello", idempotency_key = "send-1" }))
      assert.is_false(queued) -- the first call's answer: appended, not queued
      assert.are.equal(1, count(inst, "messages", "chat_id = " .. chat))
      assert.are.equal(0, count(inst, "queued_messages", "chat_id = " .. chat))
      assert.are.equal(id2, tonumber(psql_value(("SELECT max(id) FROM %s.messages WHERE chat_id = %d")
        :format(inst.schema, chat))))
      report[#report + 1] = "create_chat: 1 retry, 1 chat; send: 1 retry, 1 row, 0 queued"
    end)
  end)

  it("a network stall: the call returns within query_timeout + about a second; the retry writes once", function()
    H.with_instance("postgresql", function(inst)
      local w = stores(inst, { query_timeout = 1 })
      local chat = assert(w:create_chat({ owner = "alice" }))
      -- the one-statement append (prepared by a first one): sent into the
      -- stall, no answer: unknown
      assert(w:append(chat, { role = "user", content = "warm-up" }))
      proxy:stall()
      local t0 = chatstream.now()
      local ids, err, code = w:append(chat, { role = "user", content = "plain" })
      local took = chatstream.now() - t0
      proxy:resume()
      assert.is_nil(ids)
      assert.are.equal("EUNKNOWN", code, err)
      assert.is_true(took < 3, ("the call took %.2f s"):format(took))
      -- a keyed append (its BEGIN meets the stall: not sent as a write, so
      -- EBACKEND, or EUNKNOWN if the stall catches a later statement)
      proxy:stall()
      t0 = chatstream.now()
      local kids, kerr, kcode = w:append(chat, { role = "user", content = "x" }, { idempotency_key = "stalled" })
      local ktook = chatstream.now() - t0
      proxy:resume()
      assert.is_nil(kids)
      assert.is_truthy(kcode == "EBACKEND" or kcode == "EUNKNOWN", kerr)
      assert.is_true(ktook < 3, ("the keyed call took %.2f s"):format(ktook))
      local again
      local deadline, retries = os.time() + 10, 0
      repeat
        retries = retries + 1
        again = w:append(chat, { role = "user", content = "x" }, { idempotency_key = "stalled" })
      until again or os.time() > deadline
      assert.is_truthy(again)
      chatstream.sleep(0.5) -- what the stall held has reached the server
      local keyed = count(inst, "messages", "chat_id = " .. chat .. " AND content = 'x'")
      local plain = count(inst, "messages", "chat_id = " .. chat .. " AND content = 'plain'")
      assert.are.equal(1, keyed)
      assert.is_true(plain <= 1)
      report[#report + 1] = ("stall (query_timeout 1): the plain append returned EUNKNOWN in %.2f s "
        .. "(it did%s commit); the keyed one %s in %.2f s, %d retr%s, 1 row"):format(took,
        plain == 1 and "" or " not", kcode, ktook, retries, retries == 1 and "y" or "ies")
    end)
  end)

  it("a large write into a stall returns within the deadline: not sent, so EBACKEND, nothing written", function()
    H.with_instance("postgresql", function(inst)
      local w = stores(inst, { query_timeout = 1 })
      local chat = assert(w:create_chat({ owner = "alice" }))
      assert(w:append(chat, { role = "user", content = "warm-up" })) -- prepared
      proxy:stall()
      local t0 = chatstream.now()
      local ids, err, code = w:append(chat, { role = "user", content = string.rep("z", 24 << 20) })
      local took = chatstream.now() - t0
      proxy:resume()
      assert.is_nil(ids)
      assert.are.equal("EBACKEND", code, err)
      assert.is_true(took < 3, ("the 24 MiB append took %.2f s"):format(took))
      chatstream.sleep(0.5)
      assert.are.equal(1, count(inst, "messages", "chat_id = " .. chat))
      assert(w:append(chat, { role = "user", content = "after" })) -- and the store goes on
      report[#report + 1] = ("24 MiB append into a stall: EBACKEND after %.2f s (query_timeout 1), "
        .. "not written"):format(took)
    end)
  end)

  it("a synchronous commit that outlives query_timeout reports its commit, once", function()
    H.with_instance("postgresql", function(inst)
      psql_value("ALTER SYSTEM SET synchronous_standby_names = 'chatstream_nobody'")
      psql_value("SELECT pg_reload_conf()")
      local ok, e = pcall(function()
        local o = { dsn = H.dsn .. "?options=-csynchronous_commit%3Don", schema = inst.schema,
          poll_interval = 0, query_timeout = 1 }
        local w = assert(chatstream.open(o))
        inst.stores[#inst.stores + 1] = w
        local chat
        repeat -- the reload reaches the server's backends
          chat = w:create_chat({ owner = "alice" })
        until chat
        local t0 = chatstream.now()
        local ids, err = w:append(chat, { role = "user", content = "x" }, { idempotency_key = "sync" })
        local took = chatstream.now() - t0
        assert.is_truthy(ids, err) -- committed locally when its wait was cancelled: said so
        assert.is_true(took >= 0.9 and took < 3, ("took %.2f s"):format(took))
        assert.are.same(ids, assert(w:append(chat, { role = "user", content = "x" }, { idempotency_key = "sync" })))
        local one = assert(w:append(chat, { role = "user", content = "plain" })) -- the one-statement path
        assert.are.equal(2, count(inst, "messages", "chat_id = " .. chat))
        report[#report + 1] = ("synchronous commit: returned its ids after %.2f s (query_timeout 1), "
          .. "retry the same ids, 2 rows (keyed + plain %d)"):format(took, one[1])
      end)
      psql_value("ALTER SYSTEM RESET synchronous_standby_names")
      psql_value("SELECT pg_reload_conf()")
      assert(ok, e)
    end)
  end)

  it("prints what it saw", function()
    print("\nwrites whose answer is lost:")
    for _, line in ipairs(report) do
      print("  " .. line)
    end
    assert.is_true(#report >= 5)
  end)
end)
