-- spec/poll_spec.lua - the backstop poll: what it costs and what it finds.
-- One poll costs the same few statements whatever the number of
-- subscriptions and of idle chats (one state read per chunk of chats the
-- hub follows); a message, a status or a queue change whose notification
-- was lost is found by the next poll, once, in order; a snapshot is one
-- statement. Both stores; lost notifications are dropped with the memory
-- store's knob, and on PostgreSQL written by psql, which notifies nobody.
local H = require("helpers")
local chatstream = require("chatstream")

local POLL = 0.2 -- seconds: long enough for a few steps and a sweep in between

local function shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function psql_value(sql)
  local cmd = "env -u LD_PRELOAD psql -X -q -tA -v ON_ERROR_STOP=1 " .. shq(H.dsn) .. " -c " .. shq(sql)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  local ok = p:close()
  assert(ok, "psql failed: " .. sql .. ": " .. out)
  return (out:gsub("%s+$", ""))
end

--- Steps the store one step at a time until a backstop poll begins: the
-- step that begins it reads the first chunk of chat states.
local function until_poll(store)
  local p0 = store:stats().polls
  local deadline = chatstream.now() + 10 * POLL + 5
  while store:stats().polls == p0 do
    assert(chatstream.now() < deadline, "no backstop poll came")
    store:step()
  end
end

--- Every subscription's next(0) until it has nothing: each one's share of
-- the poll's work. Returns the message ids got per subscription.
local function sweep(subs)
  local got = {}
  for i, sub in ipairs(subs) do
    got[i] = H.drain(sub)
  end
  return got
end

--- The store statements one backstop poll costs: from just before it
-- begins, through a sweep of every subscription, to one more step (the
-- rest of its round). Measured again if a second poll began meanwhile.
local function poll_cost(store, subs)
  for _ = 1, 5 do
    sweep(subs)
    local st0 = store:stats()
    until_poll(store)
    sweep(subs)
    store:step()
    local st1 = store:stats()
    if st1.polls - st0.polls == 1 then
      return st1.queries - st0.queries
    end
  end
  error("every measurement met a second poll")
end

--- Lost notifications, as each store can have them. `lose(n, fn)` runs fn
-- with its next n notifications lost (memory: the drop knob); `sql(q)` runs
-- a statement outside chatstream (PostgreSQL: psql; nobody is notified).
local function losses(kind, inst)
  local L = {}
  function L.lose(n, fn)
    inst.memdb:drop_notifies(n)
    local r = { fn() }
    inst.memdb:drop_notifies(0)
    return table.unpack(r)
  end
  function L.sql(q)
    return psql_value((q:gsub("%%s", inst.schema)))
  end
  --- A message committed as chatstream commits it (the chat row locked,
  -- prev_id chained, last_message_id moved), with no notification.
  function L.silent_message(store, chat, content)
    if kind == "memory" then
      return L.lose(1, function()
        return assert(store:append(chat, { role = "user", content = content }))[1]
      end)
    end
    local sql = ("WITH c AS (SELECT id, last_message_id FROM %%s.chats WHERE id = %d FOR UPDATE), "
      .. "m AS (INSERT INTO %%s.messages (chat_id, role, content, prev_id) "
      .. "SELECT id, 'user', '%s', last_message_id FROM c RETURNING id), "
      .. "u AS (UPDATE %%s.chats SET last_message_id = m.id FROM m WHERE %%s.chats.id = %d) "
      .. "SELECT id FROM m"):format(chat, content, chat)
    return math.tointeger(tonumber(L.sql(sql)))
  end
  return L
end

describe("the backstop poll", function()
  H.each_backend(_ENV, function(kind)
    local inst, writer
    before_each(function()
      inst = H.new_instance(kind)
      writer = inst:open()
    end)
    after_each(function()
      inst:close()
    end)

    --- n chats, each with a message and a queued one (its queue is not
    -- empty: the poll compares the queue's signature too), and per chats
    -- subscriptions on each in `reader`, their snapshots taken.
    local function idle(reader, n, per)
      local subs, chats = {}, {}
      for i = 1, n do
        local chat = assert(writer:create_chat({ owner = "alice", title = "idle " .. i }))
        chats[i] = chat
        assert(writer:send(chat, { content = "hello" })) -- the chat is pending now
        local _, queued = assert(writer:send(chat, { content = "later" }))
        assert.is_true(queued)
        for _ = 1, per do
          subs[#subs + 1] = assert(reader:subscribe(chat))
        end
      end
      sweep(subs)
      return subs, chats
    end

    it("costs one statement whatever the number of subscriptions (1 or 200 on a chat)", function()
      local costs = {}
      for _, n in ipairs({ 1, 200 }) do
        local reader = inst:open({ poll_interval = POLL })
        local subs = idle(reader, 1, n)
        costs[n] = poll_cost(reader, subs)
        for _, s in ipairs(subs) do
          s:close()
        end
        reader:close()
      end
      assert.are.same({ [1] = 1, [200] = 1 }, costs)
    end)

    it("reads no status again for subscriptions whose status notification is queued (200 on a chat)", function()
      local reader = inst:open({ poll_interval = POLL })
      local chat = assert(writer:create_chat({ owner = "alice" }))
      local subs = {}
      for i = 1, 200 do
        subs[i] = assert(reader:subscribe(chat))
      end
      sweep(subs)
      local n0 = reader:stats().notifications
      assert(writer:send(chat, { content = "go" })) -- a message, and the status pending
      H.settle(reader, n0 + 2) -- routed: each subscription has them queued, unread
      local q0 = reader:stats().queries
      until_poll(reader) -- the poll sees the newer version: already on its way
      local got = sweep(subs)
      reader:step()
      local cost = reader:stats().queries - q0
      assert.is_true(cost <= 3, "the poll and the subscriptions cost " .. cost .. " statements")
      for i = 1, 200 do
        assert.are.equal(1, #got[i])
      end
      for _, sub in ipairs(subs) do
        sub:close()
      end
    end)

    it("costs one statement whatever the number of idle chats it follows (1 or 300)", function()
      local costs = {}
      for _, n in ipairs({ 1, 300 }) do
        local reader = inst:open({ poll_interval = POLL })
        local subs = idle(reader, n, 1)
        costs[n] = poll_cost(reader, subs)
        for _, s in ipairs(subs) do
          s:close()
        end
        reader:close()
      end
      assert.are.same({ [1] = 1, [300] = 1 }, costs)
    end)

    it("finds a message committed without a notification, once, in order, under every strategy", function()
      local L = losses(kind, inst)
      local reader = inst:open({ poll_interval = POLL })
      local chat = assert(writer:create_chat({ owner = "alice" }))
      local variants = {
        { strategy = "watermark" },
        { strategy = "watermark", ordered = false },
        { strategy = "rescan" },
        { strategy = "last_id" },
      }
      local subs = {}
      for i, v in ipairs(variants) do
        subs[i] = assert(reader:subscribe(chat, v))
      end
      sweep(subs)
      local n0 = reader:stats().notifications
      -- Twice: what the first poll read (the chat's memo) must not stand in
      -- for what the second one has to find.
      for round = 1, 2 do
        local ids = {}
        for i = 1, 3 do
          ids[i] = L.silent_message(writer, chat, "silent " .. round .. "." .. i)
        end
        for i, sub in ipairs(subs) do
          local got = {}
          for _ = 1, #ids do
            local ev, err = H.next_message(sub, 10 * POLL + 5)
            assert(ev, "variant " .. i .. ", round " .. round .. ": " .. tostring(err))
            got[#got + 1] = ev.id
          end
          assert.are.same(ids, got, "variant " .. i .. ", round " .. round)
        end
      end
      -- Exactly once: the polls after it find nothing more.
      until_poll(reader)
      until_poll(reader)
      for i, got in ipairs(sweep(subs)) do
        assert.are.same({}, got, "variant " .. i)
      end
      assert.are.equal(n0, reader:stats().notifications) -- nothing was notified: the poll found them
      assert.is_true(reader:stats().polls >= 3)
    end)

    it("costs one statement for the chats that moved, shared by their subscriptions", function()
      local L = losses(kind, inst)
      local reader = inst:open({ poll_interval = POLL })
      local subs, chats = idle(reader, 20, 5)
      for _, i in ipairs({ 3, 17 }) do -- 2 of the 20 chats, with 5 subscriptions each
        L.silent_message(writer, chats[i], "moved " .. i)
      end
      local st0 = reader:stats()
      until_poll(reader)
      local got = sweep(subs)
      reader:step()
      local st1 = reader:stats()
      local delivered = 0
      for _, g in ipairs(got) do
        delivered = delivered + #g
      end
      assert.are.equal(2 * 5, delivered)
      -- the state read, then one statement for both moved chats' messages
      -- (hub_prefetch), which every subscription's pass shares
      assert.are.equal(1 + 1, st1.queries - st0.queries)
      assert.are.equal(2 * 5, st1.shared_passes - st0.shared_passes)
      assert.are.equal(1, st1.polls - st0.polls)
    end)

    it("finds a status change whose notification was lost", function()
      local L = losses(kind, inst)
      local reader = inst:open({ poll_interval = POLL })
      local chat = assert(writer:create_chat({ owner = "alice" }))
      local sub = assert(reader:subscribe(chat))
      assert.are.same(H.status_event(chat), sub:next(0))
      if kind == "memory" then
        L.lose(10, function()
          assert(writer:send(chat, { content = "go" })) -- a message and the status pending
        end)
      else
        L.sql("WITH c AS (SELECT id, last_message_id FROM %s.chats WHERE id = " .. chat .. " FOR UPDATE), "
          .. "m AS (INSERT INTO %s.messages (chat_id, role, content, prev_id) SELECT id, 'user', 'go', "
          .. "last_message_id FROM c RETURNING id) UPDATE %s.chats SET last_message_id = m.id, "
          .. "status = 'pending', version = version + 1 FROM m WHERE %s.chats.id = " .. chat)
      end
      local ev = assert(sub:next(10 * POLL + 5))
      assert.are.equal("message", ev.kind)
      assert.are.equal("go", ev.content)
      assert.are.same({ kind = "status", chat_id = chat, status = "pending", version = 1 }, sub:next(10 * POLL + 5))
      until_poll(reader)
      until_poll(reader)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
    end)

    it("finds queue changes whose notifications were lost: an item added, then the order changed", function()
      local L = losses(kind, inst)
      local reader = inst:open({ poll_interval = POLL })
      local chat = assert(writer:create_chat({ owner = "alice" }))
      assert(writer:send(chat, { content = "busy" })) -- pending: what comes next queues
      local q1 = select(1, writer:send(chat, { content = "first" }))
      local sub = assert(reader:subscribe(chat))
      H.drain(sub)
      local q2
      if kind == "memory" then
        q2 = L.lose(10, function()
          return (writer:send(chat, { content = "second" }))
        end)
      else
        q2 = math.tointeger(tonumber(L.sql("INSERT INTO %s.queued_messages (chat_id, content, position) VALUES ("
          .. chat .. ", 'second', 2) RETURNING id")))
      end
      local function next_queue()
        while true do
          local ev, err = sub:next(10 * POLL + 5)
          assert(ev, tostring(err))
          if ev.kind == "queue" then
            local ids = {}
            for i, item in ipairs(ev.items) do
              ids[i] = item.id
            end
            return ids
          end
        end
      end
      assert.are.same({ q1, q2 }, next_queue())
      -- The same items in another order: the poll tells them apart.
      if kind == "memory" then
        L.lose(10, function()
          assert(writer:move_queued(chat, q2))
        end)
      else
        L.sql("UPDATE %s.queued_messages SET position = 0 WHERE id = " .. q2)
      end
      assert.are.same({ q2, q1 }, next_queue())
      until_poll(reader)
      until_poll(reader)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
    end)
  end)

  describe("on postgresql, after a listener reconnect", function()
    if not H.require_pg(_ENV) then
      return
    end
    it("catches every chat up with one state read and a pass per chat that moved", function()
      H.with_instance("postgresql", function(inst)
        local writer = inst:open()
        local reader = inst:open() -- no backstop poll: only the reconnect reads
        local chats, subs = {}, {}
        for i = 1, 21 do
          chats[i] = assert(writer:create_chat({ owner = "alice", title = "c" .. i }))
          for _ = 1, i == 1 and 50 or 1 do
            subs[#subs + 1] = assert(reader:subscribe(chats[i]))
          end
        end
        sweep(subs)
        -- A message committed with no notification (as if it had been sent
        -- while the listener was gone: the store's listener thread may be
        -- back within milliseconds, so a real one might still arrive).
        local sql = ("WITH c AS (SELECT id, last_message_id FROM %s.chats WHERE id = %d FOR UPDATE), "
          .. "m AS (INSERT INTO %s.messages (chat_id, role, content, prev_id) "
          .. "SELECT id, 'user', 'while it was gone', last_message_id FROM c RETURNING id), "
          .. "u AS (UPDATE %s.chats SET last_message_id = m.id FROM m WHERE %s.chats.id = %d) "
          .. "SELECT id FROM m"):format(inst.schema, chats[1], inst.schema, inst.schema, inst.schema, chats[1])
        local id = math.tointeger(tonumber(psql_value(sql)))
        local st0 = reader:stats()
        local pid = reader:listener_pid()
        assert.are.equal("t", psql_value("SELECT pg_terminate_backend(" .. pid .. ")"))
        local deadline = chatstream.now() + 5
        while psql_value("SELECT count(*) FROM pg_stat_activity WHERE pid = " .. pid) ~= "0" do
          assert(chatstream.now() < deadline, "the listener backend did not exit")
        end
        deadline = chatstream.now() + 10
        while reader:stats().reconnects == st0.reconnects do
          assert(chatstream.now() < deadline, "the listener did not reconnect")
          reader:step(0.05)
        end
        local got = sweep(subs)
        reader:step()
        local st1 = reader:stats()
        for i = 1, 50 do
          assert.are.same({ id }, got[i], "subscription " .. i .. " of the chat that moved")
        end
        for i = 51, #subs do
          assert.are.same({}, got[i])
        end
        -- the state of the 21 chats, one DB pass for the moved chat's 50
        -- subscriptions (49 share it)
        assert.are.equal(1 + 1, st1.queries - st0.queries)
        assert.are.equal(49, st1.shared_passes - st0.shared_passes)
        assert.are.equal(50, st1.resyncs - st0.resyncs)
      end)
    end)
  end)

  describe("on memory", function()
    it("reads at most 1000 chats per statement, one statement per step (1001 chats: two steps)", function()
      local db = chatstream.memory()
      local writer = chatstream.open({ memory = db })
      local reader = chatstream.open({ memory = db, poll_interval = POLL })
      local subs = {}
      for i = 1, 1001 do
        subs[i] = assert(reader:subscribe(assert(writer:create_chat({ owner = "alice", title = "c" .. i }))))
      end
      sweep(subs)
      local q0 = reader:stats().queries
      until_poll(reader)
      assert.are.equal(q0 + 1, reader:stats().queries) -- the first 1000
      reader:step()
      assert.are.equal(q0 + 2, reader:stats().queries) -- the last one
      sweep(subs)
      reader:step()
      assert.are.equal(q0 + 2, reader:stats().queries) -- nothing moved: nothing more
      for _, s in ipairs(subs) do
        s:close()
      end
      reader:close()
      writer:close()
      db:close()
    end)
  end)
end)

describe("a snapshot", function()
  H.each_backend(_ENV, function(kind)
    local inst, store
    before_each(function()
      inst = H.new_instance(kind)
      store = inst:open()
    end)
    after_each(function()
      inst:close()
    end)

    it("is one statement: status, queue and the first page of messages", function()
      local chat = assert(store:create_chat({ owner = "alice" }))
      local id = assert(store:send(chat, { content = "hi" }))
      local qid = select(1, store:send(chat, { content = "queued" }))
      local reader = inst:open({ page_size = 2 })
      for round = 1, 3 do
        local q0 = reader:stats().queries
        local sub = assert(reader:subscribe(chat))
        assert.are.equal(q0 + 1, reader:stats().queries, "subscribe " .. round)
        local ev = sub:next(0)
        assert.are.same({ kind = "status", chat_id = chat, status = "pending", version = 1 }, ev)
        ev = sub:next(0)
        assert.are.equal("queue", ev.kind)
        assert.are.equal(qid, ev.items[1].id)
        assert.are.equal("queued", ev.items[1].content)
        ev = sub:next(0)
        assert.are.equal(id, ev.id)
        assert.are.equal(q0 + 1, reader:stats().queries)
        sub:close()
        assert(store:append(chat, { role = "assistant", content = "more " .. round }))
      end
    end)

    it("is one statement when it refuses: a missing chat, a cursor beyond the last message", function()
      local chat = assert(store:create_chat({ owner = "alice" }))
      local q0 = store:stats().queries
      local sub, err, code = store:subscribe(chat + 1000)
      assert.is_nil(sub)
      assert.are.equal("ENOTFOUND", code, err)
      assert.are.equal(q0 + 1, store:stats().queries)
      sub, err, code = store:subscribe(chat, { after = 5 })
      assert.is_nil(sub)
      assert.are.equal("EINVAL", code)
      H.contains("beyond the last message", err)
      assert.are.equal(q0 + 2, store:stats().queries)
    end)
  end)
end)
