-- spec/idempotency_spec.lua - writes with an idempotency key, on both stores: a
-- retry with the same key returns the first call's result and writes nothing,
-- so a caller can retry any failed write (EUNKNOWN above all) safely.
local H = require("helpers")

local function rows(store, chat)
  local sub = assert(store:subscribe(chat))
  local ids = H.drain(sub)
  sub:close()
  return ids
end

describe("idempotency keys", function()
  H.each_backend(_ENV, function(kind)
    local inst, store
    before_each(function()
      inst = H.new_instance(kind)
      store = inst:open()
    end)
    after_each(function()
      inst:close()
    end)

    it("append: a retry returns the same ids and writes nothing", function()
      local chat = store:create_chat({ owner = "alice" })
      local reader = inst:open()
      local sub = assert(reader:subscribe(chat))
      local first = assert(store:append(chat, { role = "user", content = "hi" }, { idempotency_key = "k1" }))
      local again = assert(store:append(chat, { role = "user", content = "hi" }, { idempotency_key = "k1" }))
      assert.are.same(first, again)
      local other = inst:open() -- another process's store, the same key
      assert.are.same(first, assert(other:append(chat, { role = "user", content = "hi" }, { idempotency_key = "k1" })))
      assert.are.same(first, rows(store, chat))
      -- the reader got it once
      local got, deadline = {}, os.time() + 5
      while #got < 1 and os.time() <= deadline do
        H.drain(sub, got, 0.05)
      end
      H.drain(sub, got, 0.2)
      assert.are.same(first, got)
      -- another key writes
      local next = assert(store:append(chat, { role = "user", content = "hi" }, { idempotency_key = "k2" }))
      assert.are_not.same(first, next)
      assert.are.equal(2, #rows(store, chat))
    end)

    it("a multi-message append: the retry returns all its ids", function()
      local chat = store:create_chat({ owner = "alice" })
      local msgs = { { role = "user", content = "a" }, { role = "assistant", content = "b" } }
      local first = assert(store:append(chat, msgs, { idempotency_key = "two" }))
      assert.are.equal(2, #first)
      assert.are.same(first, assert(store:append(chat, msgs, { idempotency_key = "two" })))
      assert.are.same(first, rows(store, chat))
      -- the same key for another number of messages is a caller's bug
      local r, err, code = store:append(chat, { role = "user", content = "a" }, { idempotency_key = "two" })
      assert.is_nil(r)
      assert.are.equal("EINVAL", code)
      H.contains("idempotency key used before", err)
      assert.are.same(first, rows(store, chat))
    end)

    it("a worker's append with a key: its retry returns the ids, also once the turn has ended", function()
      local chat = store:create_chat({ owner = "alice" })
      store:send(chat, { content = "go" })
      assert.are.same({ chat }, store:acquire({ worker = "w1" }))
      local o = { worker = "w1", idempotency_key = "reply-1" }
      local first = assert(store:append(chat, { role = "assistant", content = "done" }, o))
      assert.are.same(first, assert(store:append(chat, { role = "assistant", content = "done" }, o)))
      assert(store:finish(chat, "waiting", { worker = "w1" }))
      -- the first call committed: its retry says so, not ESTATE
      assert.are.same(first, assert(store:append(chat, { role = "assistant", content = "done" }, o)))
      assert.are.equal(2, #rows(store, chat))
      -- a new write of the worker's after its turn: ESTATE, nothing written
      local r, _, code = store:append(chat, { role = "assistant", content = "late" },
        { worker = "w1", idempotency_key = "reply-2" })
      assert.is_nil(r)
      assert.are.equal("ESTATE", code)
      assert.are.equal(2, #rows(store, chat))
    end)

    it("a key used before for another request is EINVAL, writing nothing", function()
      local chat = store:create_chat({ owner = "alice" })
      local first = assert(store:append(chat, { role = "user", content = "a" }, { idempotency_key = "K" }))
      for _, other in ipairs({
        function() return store:append(chat, { role = "user", content = "b" }, { idempotency_key = "K" }) end,
        function() return store:append(chat, { role = "assistant", content = "a" }, { idempotency_key = "K" }) end,
        function() return store:send(chat, { content = "a", idempotency_key = "K" }) end,
      }) do
        local r, err, code = other()
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        H.contains("idempotency key used before", err)
      end
      assert.are.same(first, rows(store, chat))
      local s1 = assert(store:send(chat, { content = "x", idempotency_key = "S" }))
      local r, _, code = store:send(chat, { content = "y", idempotency_key = "S" })
      assert.is_nil(r)
      assert.are.equal("EINVAL", code)
      assert.are.equal(s1, assert(store:send(chat, { content = "x", idempotency_key = "S" })))
    end)

    if kind == "postgresql" then
      it("create_chat with a key waits for a twin in flight and returns its chat", function()
        local sql = ("BEGIN; INSERT INTO %s.chats (owner, idempotency_key) VALUES ('carol', 'twin'); "
          .. "SELECT pg_sleep(1); COMMIT;"):format(inst.schema)
        local twin = io.popen(("env -u LD_PRELOAD psql -X -q %q -c %q >/dev/null 2>&1; echo done")
          :format(H.dsn, sql))
        local deadline = os.time() + 5
        repeat -- the twin's insert is in (uncommitted) when its row lock shows
          local p = io.popen(("env -u LD_PRELOAD psql -X -tA %q -c %q"):format(H.dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(1)%' AND state = 'active'"
              .. " AND pid <> pg_backend_pid()"))
          local busy = p:read("a"):match("%d+")
          p:close()
        until busy ~= "0" or os.time() > deadline
        local id, err = store:create_chat({ owner = "carol", idempotency_key = "twin" })
        assert.are.equal("done", (twin:read("a"):gsub("%s+$", "")))
        twin:close()
        assert.is_truthy(id, err)
        local p = io.popen(("env -u LD_PRELOAD psql -X -tA %q -c %q"):format(H.dsn,
          ("SELECT id FROM %s.chats WHERE owner = 'carol'"):format(inst.schema)))
        local ids = p:read("a"):gsub("%s+$", "")
        p:close()
        assert.are.equal(tostring(id), ids) -- one chat: the twin's
      end)
    end

    it("send: a retry returns the same id and queued flag, on an idle and on a busy chat", function()
      local chat = store:create_chat({ owner = "alice" })
      local id, queued = assert(store:send(chat, { content = "first", idempotency_key = "s1" }))
      assert.is_false(queued)
      local v = store:chat(chat).version
      local id2, queued2 = assert(store:send(chat, { content = "first", idempotency_key = "s1" }))
      assert.are.same({ id, false }, { id2, queued2 })
      assert.are.equal(v, store:chat(chat).version) -- nothing changed
      assert.are.equal(1, #rows(store, chat))
      -- busy now (pending): the next one queues, and its retry does not queue again
      local q, qd = assert(store:send(chat, { content = "second", idempotency_key = "s2" }))
      assert.is_true(qd)
      local q2, qd2 = assert(store:send(chat, { content = "second", idempotency_key = "s2" }))
      assert.are.same({ q, true }, { q2, qd2 })
      assert.are.equal(1, #store:queued(chat))
    end)

    it("create_chat: a retry by the same owner returns the same chat", function()
      local a = assert(store:create_chat({ owner = "alice", title = "t", idempotency_key = "c1" }))
      assert.are.equal(a, assert(store:create_chat({ owner = "alice", title = "t", idempotency_key = "c1" })))
      local b = assert(store:create_chat({ owner = "bob", title = "t", idempotency_key = "c1" }))
      assert.are_not.equal(a, b) -- per owner
      local c = assert(store:create_chat({ owner = "alice", title = "t" }))
      local d = assert(store:create_chat({ owner = "alice", title = "t" }))
      assert.are_not.equal(c, d) -- no key: two chats
      assert.are.equal(a, assert(inst:open():create_chat({ owner = "alice", idempotency_key = "c1" })))
    end)

    it("refuses a key that is empty, too long or not UTF-8, and a key of the wrong type", function()
      local chat = store:create_chat({ owner = "alice" })
      for _, bad in ipairs({ "", string.rep("k", 256), "\xff" }) do
        local r, _, code = store:append(chat, { role = "user", content = "x" }, { idempotency_key = bad })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        r, _, code = store:send(chat, { content = "x", idempotency_key = bad })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        r, _, code = store:create_chat({ owner = "alice", idempotency_key = bad })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
      end
      assert.are.same({}, rows(store, chat))
      assert(store:append(chat, { role = "user", content = "x" }, { idempotency_key = string.rep("k", 255) }))
      H.contains("option 'idempotency_key' must be a string",
        H.raises(store.append, store, chat, { role = "user", content = "x" }, { idempotency_key = 1 }))
    end)
  end)
end)
