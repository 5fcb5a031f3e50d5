-- spec/lifecycle_spec.lua - the chat lifecycle on both stores: versioned
-- status, the queue, promote_queued, workers, parts, authorization.
local chatstream = require("chatstream")
local agent = require("chatstream.agent")
local H = require("helpers")
local _ -- for ignored results

--- Reads events of sub until done(events) is true (checked after each event
-- and when idle), at most `limit` seconds; returns the events. On PostgreSQL
-- notifications arrive asynchronously: this waits for them.
local function collect(sub, done, limit)
  local evs = {}
  local deadline = os.time() + (limit or 5) + 1
  while not done(evs) do
    local ev = sub:next(0.05)
    if ev then
      evs[#evs + 1] = ev
    elseif os.time() > deadline then
      break
    end
  end
  return evs
end

--- Everything the subscription has now and until it is idle for `idle` s.
local function settle_events(sub, idle)
  local evs = {}
  for ev in sub:events(idle or 0.3) do
    evs[#evs + 1] = ev
  end
  return evs
end

local function of_kind(evs, kind)
  local t = {}
  for _, ev in ipairs(evs) do
    if ev.kind == kind then
      t[#t + 1] = ev
    end
  end
  return t
end

local function ids_of(evs)
  local t = {}
  for _, ev in ipairs(of_kind(evs, "message")) do
    t[#t + 1] = ev.id
  end
  return t
end

local function last_status(evs)
  local st = of_kind(evs, "status")
  return st[#st]
end

--- Waits until the chat has `status` (other hubs' writes are visible at
-- once, this only guards against typos in the specs' own sequencing).
local function status_of(store, chat)
  return assert(store:chat(chat)).status
end

local function sleep(seconds)
  os.execute("sleep " .. seconds)
end

local function count_messages(store, chat)
  return #agent.history(store, chat)
end

describe("chat lifecycle", function()
  H.each_backend(_ENV, function(kind)
    local inst, store
    before_each(function()
      inst = H.new_instance(kind)
      store = inst:open()
    end)
    after_each(function()
      inst:close()
    end)

    --- A chat in requires_action: user "/tool", the assistant's client tool
    -- call. Returns chat, {user id, assistant id}, the call id.
    local function in_requires_action(owner)
      local chat = store:create_chat({ owner = owner or "alice" })
      local uid = assert(store:send(chat, { content = "/tool please", actor = owner and owner or nil }))
      assert.are.same({ chat }, store:acquire({ worker = "w1" }))
      local final, ids = agent.turn(store, chat, { worker = "w1", stream = false })
      assert.are.equal("requires_action", final)
      return chat, { uid, ids[1] }, "call-" .. uid
    end

    describe("submit_tool_results", function()
      it("appends the results of the open calls and sets pending in one transaction", function()
        local chat, ids, call = in_requires_action()
        local sub <close> = assert(store:subscribe(chat, { after = ids[2] }))
        settle_events(sub, 0)
        local v = store:chat(chat).version
        local got = assert(store:submit_tool_results(chat, { { tool_call_id = call, content = "42" } }))
        assert.are.equal(1, #got)
        local c = store:chat(chat)
        assert.are.same({ "pending", v + 1 }, { c.status, c.version })
        local hist = agent.history(store, chat)
        local last = hist[#hist]
        assert.are.same({ got[1], "tool", call, "42" }, { last.id, last.role, last.tool_call_id, last.content })
        local evs = collect(sub, function(e) return #ids_of(e) == 1 and last_status(e) ~= nil end)
        assert.are.same(got, ids_of(evs))
        assert.are.equal("pending", last_status(evs).status)
        assert.are.same({ chat }, store:acquire({ worker = "w2" })) -- a worker resumes it
      end)

      it("refuses calls that are not open, twice given, or a chat in another status, writing nothing", function()
        local chat, _, call = in_requires_action()
        local before = count_messages(store, chat)
        local v = store:chat(chat).version
        local function refused(results, code, msg)
          local r, err, c = store:submit_tool_results(chat, results)
          assert.are.same({ nil, code }, { r, c })
          H.contains(msg, err)
          assert.are.equal(before, count_messages(store, chat))
          assert.are.equal(v, store:chat(chat).version)
        end
        refused({ { tool_call_id = "call-nope", content = "x" } }, "EINVAL",
          "tool_call_id call-nope is not an open call of chat " .. chat .. "'s last turn")
        refused({ { tool_call_id = call, content = "x" }, { tool_call_id = call, content = "y" } }, "EINVAL",
          "(given twice)")
        refused({ { tool_call_id = call, content = "x" }, { tool_call_id = "call-nope", content = "y" } }, "EINVAL",
          "call-nope")
        assert(store:submit_tool_results(chat, { { tool_call_id = call, content = "done" } }))
        local r, err, code = store:submit_tool_results(chat, { { tool_call_id = call, content = "again" } })
        assert.are.same({ nil, "ESTATE" }, { r, code })
        H.contains("is pending, not requires_action", err)
        H.contains("expected a list of 1 to 4096", H.raises(store.submit_tool_results, store, chat, {}))
        H.contains("tool_call_id must be a string",
          H.raises(store.submit_tool_results, store, chat, { { content = "x" } }))
        H.contains("unknown option 'role'",
          H.raises(store.submit_tool_results, store, chat, { { tool_call_id = call, content = "x", role = "user" } }))
        r, _, code = store:submit_tool_results(99999, { { tool_call_id = call, content = "x" } })
        assert.are.same({ nil, "ENOTFOUND" }, { r, code })
      end)
    end)

    describe("archive", function()
      it("archives: the turn interrupted, send and promote refused, the queue kept; unarchive undoes it", function()
        local chat = store:create_chat({ owner = "alice" })
        assert.is_false(store:chat(chat).archived)
        assert(store:send(chat, { content = "work" }))
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        local q = assert(store:send(chat, { content = "queued" }))
        local reader = inst:open()
        local sub <close> = assert(reader:subscribe(chat))
        settle_events(sub, 0)
        local v = store:chat(chat).version
        local c = assert(store:archive(chat, { actor = "alice" }))
        assert.are.same({ true, "waiting", v + 1, "w1" }, { c.archived, c.status, c.version, c.interrupted_worker })
        local evs = collect(sub, function(e) return last_status(e) and last_status(e).archived end)
        assert.are.same({ "waiting", true }, { last_status(evs).status, last_status(evs).archived })
        assert.are.same({ v + 1 }, { store:archive(chat).version }) -- again: nothing changes
        local r, err, code = store:send(chat, { content = "more" })
        assert.are.same({ nil, "ESTATE" }, { r, code })
        H.contains("chat " .. chat .. " is archived", err)
        r, _, code = store:promote_queued(chat, q)
        assert.are.same({ nil, "ESTATE" }, { r, code })
        assert.are.same({ q }, { store:queued(chat)[1].id })
        -- its worker may still write its partial output and finish; the queue stays
        assert(store:append(chat, { role = "assistant", content = "partial" }, { worker = "w1" }))
        local _, final = assert(store:finish(chat, "waiting", { worker = "w1" }))
        assert.are.equal("waiting", final)
        assert.are.equal(1, #store:queued(chat))
        assert.are.equal(0, store:recover().promoted)
        local late <close> = assert(reader:subscribe(chat))
        assert.is_true(settle_events(late, 0)[1].archived) -- the snapshot says so
        c = assert(store:unarchive(chat))
        assert.is_false(c.archived)
        evs = collect(sub, function(e) return last_status(e) and last_status(e).version == c.version end)
        assert.is_nil(last_status(evs).archived)
        local id, queued = assert(store:send(chat, { content = "more" }))
        assert.is_true(queued) -- behind the backlog, whose head goes now
        assert.are.equal("pending", store:chat(chat).status)
        local _ = id
        r, _, code = store:archive(99999)
        assert.are.same({ nil, "ENOTFOUND" }, { r, code })
      end)
    end)

    describe("a keyed retry", function()
      it("tells readers the chat's status as it is: archived, with its error (memory knobs)", function()
        if kind ~= "memory" then
          return -- the knob that loses notifications is the memory store's
        end
        local chat = store:create_chat()
        assert(store:send(chat, { content = "work", idempotency_key = "k" }))
        local reader = inst:open()
        local sub <close> = assert(reader:subscribe(chat))
        settle_events(sub, 0)
        inst.memdb:drop_notifies(1) -- the archive's status hint is lost
        assert(store:archive(chat))
        inst.memdb:drop_notifies(0)
        assert(store:send(chat, { content = "work", idempotency_key = "k" })) -- the retry re-sends the status
        local evs = collect(sub, function(e) return last_status(e) and last_status(e).version == 2 end)
        assert.are.same({ "waiting", true }, { last_status(evs).status, last_status(evs).archived })
      end)
    end)

    describe("recovery", function()
      it("moves a chat left in requires_action past action_timeout to error, in acquire and recover", function()
        local s = inst:open({ action_timeout = 0.2 })
        local function stuck_chat()
          local chat = s:create_chat()
          assert(s:send(chat, { content = "/tool please" }))
          assert.are.same({ chat }, s:acquire({ worker = "w1" }))
          local final = agent.turn(s, chat, { worker = "w1", stream = false })
          assert.are.equal("requires_action", final)
          return chat
        end
        local a, b = stuck_chat(), stuck_chat()
        local sub <close> = assert(s:subscribe(a))
        settle_events(sub, 0)
        assert.are.same({ expired = 0, revived = 0, released = 0, promoted = 0 }, s:recover()) -- not yet
        sleep(0.4)
        assert.are.same({}, s:acquire({ worker = "w2" })) -- expires both on its way
        for _, chat in ipairs({ a, b }) do
          local c = s:chat(chat)
          assert.are.same({ "error", "requires_action for more than 0.2 s (action_timeout)" },
            { c.status, c.last_error })
          assert.is_nil(c.worker)
        end
        local evs = collect(sub, function(e) return last_status(e) and last_status(e).status == "error" end)
        assert.are.equal("requires_action for more than 0.2 s (action_timeout)", last_status(evs).error)
        local c3 = stuck_chat()
        sleep(0.4)
        assert.are.same({ expired = 1, revived = 0, released = 0, promoted = 0 }, s:recover())
        assert.are.equal("error", s:chat(c3).status)
        -- and through the agent's worker loop, which runs a recovery pass
        local c4 = stuck_chat()
        sleep(0.4)
        agent.run(s, { worker = "w9", idle = 0 })
        assert.are.equal("error", s:chat(c4).status)
        -- the default is 300 s: nothing expires here
        local chat = store:create_chat()
        assert(store:send(chat, { content = "/tool" }))
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        agent.turn(store, chat, { worker = "w1", stream = false })
        assert.are.equal(0, store:recover().expired)
        assert.are.equal("requires_action", store:chat(chat).status)
        H.contains("option 'action_timeout' must be a number > 0", H.raises(inst.open, inst, { action_timeout = 0 }))
      end)

      it("releases silent workers' chats, revives interrupted ones and promotes stranded queues", function()
        local s = inst:open({ stale_after = 0.2 })
        -- running on a worker that went silent: pending for anyone
        local run = s:create_chat()
        assert(s:send(run, { content = "work" }))
        assert.are.same({ run }, s:acquire({ worker = "w1" }))
        -- interrupted by a promote, then its worker went silent
        local int = s:create_chat()
        assert(s:send(int, { content = "work" }))
        assert.are.same({ int }, s:acquire({ worker = "w2" }))
        local q = assert(s:send(int, { content = "instead" }))
        assert(s:promote_queued(int, q))
        assert.are.equal("w2", s:chat(int).interrupted_worker)
        -- an error turn that left a queue behind
        local err = s:create_chat()
        assert(s:send(err, { content = "work" }))
        assert.are.same({ err }, s:acquire({ worker = "w3" }))
        assert(s:send(err, { content = "queued" }))
        assert(s:finish(err, "error", { worker = "w3" }))
        assert.are.same({ "error", 1 }, { s:chat(err).status, #s:queued(err) })
        sleep(0.4)
        assert.are.same({ expired = 0, revived = 1, released = 1, promoted = 1 }, s:recover())
        for _, chat in ipairs({ run, int, err }) do
          local c = s:chat(chat)
          assert.are.equal("pending", c.status, chat)
          assert.is_nil(c.worker)
        end
        assert.are.equal("queued", agent.history(s, err)[#agent.history(s, err)].content)
        assert.are.equal(0, #s:queued(err))
        assert.are.same({ expired = 0, revived = 0, released = 0, promoted = 0 }, s:recover()) -- nothing left
        H.contains("limit must be 1 to 1024", H.raises(s.recover, s, { limit = 2000 }))
      end)
    end)

    describe("recorded errors", function()
      it("finish with error records the error: store:chat, the status events, cleared by the next turn", function()
        local chat = store:create_chat()
        assert(store:send(chat, { content = "work" }))
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        local reader = inst:open() -- another hub: the notification carries the error
        local sub <close> = assert(reader:subscribe(chat))
        settle_events(sub, 0)
        assert(store:finish(chat, "error", { worker = "w1", error = "the model timed out" }))
        local evs = collect(sub, function(e) return last_status(e) and last_status(e).status == "error" end)
        assert.are.equal("the model timed out", last_status(evs).error)
        assert.are.equal("the model timed out", store:chat(chat).last_error)
        -- a late joiner's snapshot says it too
        local late <close> = assert(reader:subscribe(chat))
        local first = settle_events(late, 0)[1]
        assert.are.same({ "error", "the model timed out" }, { first.status, first.error })
        -- the next turn: the error stays until it finishes otherwise
        assert(store:send(chat, { content = "again" }))
        assert.are.equal("the model timed out", store:chat(chat).last_error)
        assert.are.same({ chat }, store:acquire({ worker = "w2" }))
        assert(store:finish(chat, "completed", { worker = "w2" }))
        assert.is_nil(store:chat(chat).last_error)
        evs = collect(sub, function(e) return last_status(e) and last_status(e).status == "completed" end)
        for _, ev in ipairs(of_kind(evs, "status")) do
          assert.is_nil(ev.error, ev.status)
        end
        -- an error status without a text records none
        assert(store:send(chat, { content = "third" }))
        assert.are.same({ chat }, store:acquire({ worker = "w3" }))
        assert(store:finish(chat, "error", { worker = "w3" }))
        assert.is_nil(store:chat(chat).last_error)
      end)

      it("reaches a reader that missed the notification, through the backstop poll (memory knobs)", function()
        if kind ~= "memory" then
          return -- the knob that loses notifications is the memory store's
        end
        local chat = store:create_chat()
        assert(store:send(chat, { content = "work" }))
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        local reader = inst:open({ poll_interval = 0.05 })
        local sub <close> = assert(reader:subscribe(chat))
        settle_events(sub, 0)
        inst.memdb:drop_notifies(5) -- the finish's status hint is lost
        assert(store:finish(chat, "error", { worker = "w1", error = "lost, then found" }))
        local evs = collect(sub, function(e) return last_status(e) and last_status(e).status == "error" end)
        assert.are.equal("lost, then found", last_status(evs).error)
        inst.memdb:drop_notifies(0)
      end)

      it("refuses an error with another status, too long, not UTF-8, or with a NUL", function()
        local chat = store:create_chat()
        assert(store:send(chat, { content = "work" }))
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        local function refused(status, err, msg)
          local r, e, code = store:finish(chat, status, { worker = "w1", error = err })
          assert.are.same({ nil, "EINVAL" }, { r, code })
          H.contains(msg, e)
        end
        refused("waiting", "x", "an error is recorded by a finish with error")
        refused("error", ("e"):rep(1025), "at most 1024 bytes")
        refused("error", "\xff", "UTF-8")
        H.contains("error must not contain a NUL byte",
          H.raises(store.finish, store, chat, "error", { worker = "w1", error = "a\0b" }))
        assert.are.equal("running", store:chat(chat).status) -- nothing was written
        assert(store:finish(chat, "error", { worker = "w1", error = ("e"):rep(1024) }))
        assert.are.equal(1024, #store:chat(chat).last_error)
      end)
    end)

    describe("interrupt", function()
      it("interrupts a running turn; its worker may append partial output till a new acquire", function()
        local chat = store:create_chat({ owner = "alice" })
        assert(store:send(chat, { content = "work" }))
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        local sub <close> = assert(store:subscribe(chat))
        settle_events(sub, 0)
        local v = store:chat(chat).version
        local c = assert(store:interrupt(chat, { actor = "alice" }))
        assert.are.same({ "waiting", v + 1, chat }, { c.status, c.version, c.id })
        assert.is_nil(c.worker)
        assert.are.equal("w1", c.interrupted_worker)
        assert.is_nil(store:chat(chat).worker)
        assert.are.same({ false, "waiting" }, { store:heartbeat(chat, "w1") })
        assert.are.same({}, store:acquire({ worker = "w2" })) -- not pending
        -- the interrupted worker appends what it had produced
        local partial = assert(store:append(chat, { role = "assistant", content = "half an answer" },
          { worker = "w1" }))
        local q = assert(store:send(chat, { content = "next" })) -- queued behind the interrupted turn
        assert.are.equal(1, #store:queued(chat))
        local _, final = assert(store:finish(chat, "waiting", { worker = "w1" }))
        assert.are.equal("pending", final) -- the finish promoted the queued message
        local hist = agent.history(store, chat)
        assert.are.same({ "work", "half an answer", "next" }, { hist[1].content, hist[2].content, hist[3].content })
        assert.is_true(partial[1] < hist[3].id, "the partial output precedes the promoted message")
        assert.are.same({ chat }, store:acquire({ worker = "w2" }))
        local r, _, code = store:append(chat, { role = "assistant", content = "late" }, { worker = "w1" })
        assert.are.same({ nil, "ESTATE" }, { r, code }) -- another worker has it now
        local evs = collect(sub, function(e) return last_status(e) and last_status(e).status == "running" end)
        local sts = {}
        for _, ev in ipairs(of_kind(evs, "status")) do
          sts[#sts + 1] = ev.status
        end
        assert.are.same({ "waiting", "pending", "running" }, sts)
        local _ = q
      end)

      it("sets a pending chat waiting, leaves idle ones alone, and checks the actor", function()
        local s = inst:open({ authorize = function(actor, chat) return actor == nil or actor == chat.owner end })
        local chat = s:create_chat({ owner = "alice" })
        assert(s:send(chat, { content = "work" }))
        local c = assert(s:interrupt(chat))
        assert.are.same({ "waiting", 2 }, { c.status, c.version })
        assert.is_nil(c.worker)
        assert.is_nil(c.interrupted_worker)
        assert.are.same({}, s:acquire({ worker = "w1" }))
        c = assert(s:interrupt(chat)) -- idle: nothing changes
        assert.are.same({ "waiting", 2 }, { c.status, c.version })
        local r, err, code = s:interrupt(chat, { actor = "mallory" })
        assert.are.same({ nil, "EAUTH" }, { r, code })
        H.contains("mallory may not interrupt", err)
        r, _, code = s:interrupt(99999)
        assert.are.same({ nil, "ENOTFOUND" }, { r, code })
        H.contains("unknown option 'worker'", H.raises(s.interrupt, s, chat, { worker = "w" }))
      end)
    end)

    describe("queue limit", function()
      it("refuses a send past max_queue with EFULL, writing nothing; a keyed retry goes once there's room", function()
        local small = inst:open({ max_queue = 2 })
        local chat = small:create_chat()
        assert.are.same({ 1, false }, { small:send(chat, { content = "first" }) }) -- appended: pending
        local q1 = assert(small:send(chat, { content = "q1" }))
        local q2 = assert(small:send(chat, { content = "q2" }))
        local sub <close> = assert(small:subscribe(chat))
        settle_events(sub, 0)
        local v = small:chat(chat).version
        local r, err, code = small:send(chat, { content = "q3", idempotency_key = "k3" })
        assert.is_nil(r)
        assert.are.equal("EFULL", code)
        H.contains("EFULL: chat " .. chat .. "'s queue holds 2 items (max_queue)", err)
        local items = small:queued(chat)
        assert.are.same({ q1, q2 }, { items[1].id, items[2].id })
        assert.are.equal(2, #items)
        assert.are.equal(v, small:chat(chat).version)
        assert.are.equal(1, count_messages(small, chat))
        assert.are.same({}, settle_events(sub, 0.2)) -- no event: nothing was written
        assert(small:delete_queued(chat, q2))
        local q3, queued = small:send(chat, { content = "q3", idempotency_key = "k3" })
        assert.is_true(queued)
        assert.are.same({ q3, true }, { small:send(chat, { content = "q3", idempotency_key = "k3" }) })
        assert.are.equal(2, #small:queued(chat))
      end)

      it("holds 20 items by default, and checks the option", function()
        local chat = store:create_chat()
        assert(store:send(chat, { content = "first" }))
        for i = 1, 20 do
          local _, queued = assert(store:send(chat, { content = "q" .. i }))
          assert.is_true(queued)
        end
        local r, _, code = store:send(chat, { content = "q21" })
        assert.are.same({ nil, "EFULL" }, { r, code })
        assert.are.equal(20, #store:queued(chat))
        H.contains("max_queue is at most 1000000", H.raises(inst.open, inst, { max_queue = 1000001 }))
        H.contains("max_queue", H.raises(inst.open, inst, { max_queue = -1 }))
      end)
    end)

    describe("status", function()
      it("starts waiting at version 0, and the snapshot starts with it", function()
        local chat = store:create_chat({ owner = "alice", title = "t" })
        local c = store:chat(chat)
        assert.are.equal("waiting", c.status)
        assert.are.equal(0, c.version)
        assert.are.equal("alice", c.owner)
        assert.are.equal("t", c.title)
        store:append(chat, { role = "user", content = "m" })
        local sub <close> = assert(store:subscribe(chat))
        local evs = settle_events(sub, 0)
        assert.are.same({ kind = "status", chat_id = chat, status = "waiting", version = 0 }, evs[1])
        assert.are.equal("message", evs[2].kind)
        assert.are.equal(2, #evs)
      end)

      it("send on an idle chat appends and sets pending in one transaction, version + 1", function()
        for _, idle in ipairs({ "waiting", "completed", "error" }) do
          local chat = store:create_chat()
          if idle ~= "waiting" then
            store:send(chat, { content = "first" })
            store:acquire({ worker = "w", limit = 10 }) -- every pending chat
            assert(store:finish(chat, idle, { worker = "w" }))
          end
          local v = store:chat(chat).version
          local sub <close> = assert(store:subscribe(chat))
          settle_events(sub, 0)
          local id, queued = assert(store:send(chat, { content = "hi" }))
          assert.is_false(queued)
          local c = store:chat(chat)
          assert.are.equal("pending", c.status)
          assert.are.equal(v + 1, c.version)
          assert.are.equal(id, c.last_message_id)
          local evs = collect(sub, function(e) return last_status(e) ~= nil end)
          assert.are.same({ id }, ids_of(evs))
          assert.are.equal("pending", last_status(evs).status)
          assert.are.equal(v + 1, last_status(evs).version)
        end
      end)

      it("refuses invalid transitions with nil, ESTATE (EINVAL for a bad status) and changes nothing", function()
        local chat = store:create_chat()
        local v = store:chat(chat).version
        local ok, err, code = store:finish(chat, "waiting")
        assert.is_nil(ok)
        assert.are.equal("ESTATE", code)
        H.contains("ESTATE: chat " .. chat .. " is waiting, not running", err)
        store:send(chat, { content = "x" })
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        for _, bad in ipairs({ "pending", "running" }) do
          ok, _, code = store:finish(chat, bad, { worker = "w1" })
          assert.is_nil(ok)
          assert.are.equal("EINVAL", code)
        end
        ok, err, code = store:finish(chat, "waiting", { worker = "w2" })
        assert.is_nil(ok)
        H.contains("not held by worker w2", err)
        assert.are.equal("ESTATE", code)
        local c = store:chat(chat)
        assert.are.equal("running", c.status)
        assert.are.equal(v + 2, c.version)
        assert.are.equal("w1", c.worker)
        -- a worker that does not hold the chat learns it from its heartbeat
        assert.is_true(store:heartbeat(chat, "w1"))
        local held, st = store:heartbeat(chat, "w2")
        assert.is_false(held)
        assert.are.equal("running", st)
      end)

      it("a status notified late is dropped: the reader ends on the newest", function()
        local chat, _ = in_requires_action()
        store:send(chat, { content = "queued" })
        local qid = store:queued(chat)[1].id
        local reader_store = inst:open()
        local sub <close> = assert(reader_store:subscribe(chat))
        settle_events(sub, 0)
        -- promote commits pending (v) but notifies late; the worker's
        -- running (v + 1) is notified first
        local p = assert(store:promote_queued(chat, qid, { prepare = true }))
        assert(p:commit())
        local v = store:chat(chat).version
        local worker_store = inst:open()
        assert.are.same({ chat }, worker_store:acquire({ worker = "w2" }))
        assert(p:publish())
        p:close()
        local evs = collect(sub, function(e)
          local s = of_kind(e, "status")
          return #s >= 1 and s[#s].version == v + 1 and #ids_of(e) == 2
        end)
        H.settle(reader_store, reader_store:stats().notifications) -- all in
        for ev in sub:events(0.2) do
          evs[#evs + 1] = ev
        end
        local st = last_status(evs)
        assert.are.equal("running", st.status)
        assert.are.equal(v + 1, st.version)
        for _, s in ipairs(of_kind(evs, "status")) do
          assert.are_not.equal("pending", s.status) -- the stale one never shows
        end
        -- and it did arrive: both status hints plus the messages and queue
        assert.is_true(reader_store:stats().notifications >= 5)
      end)
    end)

    describe("queue", function()
      it("send on a busy chat queues it; queued() lists it in order", function()
        for _, st in ipairs({ "pending", "running", "requires_action", "paused" }) do
          local chat = store:create_chat({ owner = "alice" })
          store:send(chat, { content = "start" }) -- pending
          if st ~= "pending" then
            local got = store:acquire({ worker = "w", limit = 100 })
            assert.are.equal(chat, got[#got])
            if st ~= "running" then
              assert(store:finish(chat, st, { worker = "w" }))
            end
          end
          assert.are.equal(st, status_of(store, chat))
          local ids = {}
          for i = 1, 3 do
            local id, queued = assert(store:send(chat, { content = "q" .. i, actor = "alice" }))
            assert.is_true(queued)
            ids[#ids + 1] = id
          end
          local q = store:queued(chat)
          assert.are.equal(#ids, #q)
          for i, item in ipairs(q) do
            assert.are.equal(ids[i], item.id)
            assert.are.equal("q" .. i, item.content)
            assert.are.equal("alice", item.actor)
            assert.is_true(math.abs(item.created_at - os.time()) < 120)
          end
          assert.are.equal(1, count_messages(store, chat)) -- only "start"
        end
      end)

      it("delete and move to front change the queue; subscribers get the whole queue", function()
        local chat = store:create_chat()
        store:send(chat, { content = "start" })
        local a = store:send(chat, { content = "a" })
        local b = store:send(chat, { content = "b" })
        local c = store:send(chat, { content = "c" })
        local sub <close> = assert(store:subscribe(chat))
        local evs = settle_events(sub, 0)
        local q = of_kind(evs, "queue")
        assert.are.equal(1, #q) -- in the snapshot, since it is not empty
        assert.are.equal(3, #q[1].items)
        assert(store:move_queued(chat, c))
        local got = collect(sub, function(e) return #of_kind(e, "queue") >= 1 end)
        local items = of_kind(got, "queue")[1].items
        assert.are.same({ c, a, b }, { items[1].id, items[2].id, items[3].id })
        assert(store:delete_queued(chat, a))
        got = collect(sub, function(e) return #of_kind(e, "queue") >= 1 end)
        items = of_kind(got, "queue")[1].items
        assert.are.same({ c, b }, { items[1].id, items[2].id })
        local q2 = store:queued(chat)
        assert.are.same({ c, b }, { q2[1].id, q2[2].id })
        -- unknown items, and items of another chat
        local other = store:create_chat()
        local ok, err, code = store:delete_queued(other, b)
        assert.is_nil(ok)
        assert.are.equal("ENOTFOUND", code)
        H.contains("no queued message " .. b, err)
        ok, _, code = store:move_queued(chat, 999999)
        assert.is_nil(ok)
        assert.are.equal("ENOTFOUND", code)
        ok, _, code = store:promote_queued(chat, a) -- deleted already
        assert.is_nil(ok)
        assert.are.equal("ENOTFOUND", code)
        assert.are.equal(2, #store:queued(chat))
      end)
    end)

    describe("promote_queued", function()
      it("on requires_action inserts a synthetic result per open tool call, then the user message: pending",
        function()
        local chat = store:create_chat()
        store:send(chat, { content = "go" })
        store:acquire({ worker = "w1" })
        local ids = store:append(chat, {
          { role = "assistant", content = "three calls", tool_calls = { "a", "b", "c" } },
          { role = "tool", content = "done b", tool_call_id = "b" },
        })
        assert(store:finish(chat, "requires_action", { worker = "w1" }))
        local qid = select(1, store:send(chat, { content = "never mind" }))
        local sub <close> = assert(store:subscribe(chat, { after = ids[2] }))
        settle_events(sub, 0)
        local v = store:chat(chat).version
        local new = assert(store:promote_queued(chat, qid))
        assert.are.equal(3, #new)
        local evs = collect(sub, function(e) return #ids_of(e) == 3 and last_status(e) end)
        local msgs = of_kind(evs, "message")
        assert.are.same(new, ids_of(evs))
        assert.are.equal("tool", msgs[1].role)
        assert.are.equal("a", msgs[1].tool_call_id)
        H.contains("interrupted by a queued message", msgs[1].content)
        assert.are.equal("tool", msgs[2].role)
        assert.are.equal("c", msgs[2].tool_call_id)
        assert.are.equal("user", msgs[3].role)
        assert.are.equal("never mind", msgs[3].content)
        assert.are.equal(ids[2], msgs[1].prev_id) -- one chain, one transaction
        local c = store:chat(chat)
        assert.are.equal("pending", c.status)
        assert.are.equal(v + 1, c.version)
        assert.are.same({}, store:queued(chat))
        for ev in sub:events(0.2) do
          evs[#evs + 1] = ev
        end
        assert.are.equal("pending", last_status(evs).status)
        local qs = of_kind(evs, "queue")
        assert.are.same({}, qs[#qs].items)
      end)

      it("on a running chat moves the item first and stops the worker; its finish promotes the head", function()
        local chat = store:create_chat()
        store:send(chat, { content = "work" })
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        local a = store:send(chat, { content = "a" })
        local b = store:send(chat, { content = "b" })
        local before = count_messages(store, chat)
        assert.are.same({}, assert(store:promote_queued(chat, b)))
        local c = store:chat(chat)
        assert.are.equal("waiting", c.status) -- interrupted
        assert.is_nil(c.worker)
        assert.are.equal("w1", c.interrupted_worker)
        assert.are.same({ b, a }, { store:queued(chat)[1].id, store:queued(chat)[2].id })
        assert.are.equal(before, count_messages(store, chat))
        local held, st = store:heartbeat(chat, "w1")
        assert.is_false(held)
        assert.are.equal("waiting", st)
        assert.are.same({}, store:acquire({ worker = "w2" })) -- not pending
        local _, final = assert(store:finish(chat, "waiting", { worker = "w1" }))
        assert.are.equal("pending", final)
        local hist = agent.history(store, chat)
        assert.are.equal("b", hist[#hist].content)
        assert.are.same({ a }, { store:queued(chat)[1].id })
      end)

      it("on a running chat whose worker is stale promotes at once", function()
        local s = inst:open({ stale_after = 0.2 })
        local chat = s:create_chat()
        s:send(chat, { content = "work" })
        assert.are.same({ chat }, s:acquire({ worker = "w1" }))
        local q = s:send(chat, { content = "q" })
        sleep(0.4) -- the heartbeat goes stale
        local ids = assert(s:promote_queued(chat, q))
        assert.are.equal(1, #ids)
        local c = s:chat(chat)
        assert.are.equal("pending", c.status)
        assert.is_nil(c.worker)
        -- and a stale worker's chat can be taken over by acquire
        assert.are.same({ chat }, s:acquire({ worker = "w2" }))
        sleep(0.3)
        assert.are.same({ chat }, s:acquire({ worker = "w3", stale_after = 0.1 }))
        assert.are.equal("w3", s:chat(chat).worker)
        assert.is_false((s:heartbeat(chat, "w2")))
      end)

      it("on an idle chat with a queue left appends it and sets pending", function()
        local chat = store:create_chat()
        store:send(chat, { content = "work" })
        store:acquire({ worker = "w1" })
        local q = store:send(chat, { content = "q" })
        assert(store:finish(chat, "error", { worker = "w1" })) -- error: no auto-promotion
        assert.are.equal("error", status_of(store, chat))
        local ids = assert(store:promote_queued(chat, q))
        assert.are.equal(1, #ids)
        assert.are.equal("pending", status_of(store, chat))
      end)


      it("send on an idle chat with a backlog queues behind it: the head goes first (FIFO)", function()
        local chat = store:create_chat()
        store:send(chat, { content = "work" })
        store:acquire({ worker = "w1" })
        assert(store:send(chat, { content = "older" }))
        assert(store:finish(chat, "error", { worker = "w1" })) -- error: the backlog stays
        assert.are.equal(1, #store:queued(chat))
        local id, queued = assert(store:send(chat, { content = "newer" }))
        assert.is_true(queued)
        assert.are.equal("pending", status_of(store, chat)) -- the head was promoted
        local q = store:queued(chat)
        assert.are.same({ id }, { q[1].id })
        assert.are.equal("newer", q[1].content)
        local hist = agent.history(store, chat)
        assert.are.same({ "work", "older" }, { hist[1].content, hist[2].content })
        assert.are.equal(2, #hist) -- "newer" waits for the next turn
        store:acquire({ worker = "w1" })
        assert(store:finish(chat, "waiting", { worker = "w1" }))
        hist = agent.history(store, chat)
        assert.are.equal("newer", hist[#hist].content)
        assert.are.equal(0, #store:queued(chat))
      end)
      it("with prepare = true returns a stepped publish", function()
        local chat, _, call = in_requires_action()
        local q = store:send(chat, { content = "later" })
        local sub <close> = assert(store:subscribe(chat))
        local seen = #ids_of(settle_events(sub, 0))
        local p = assert(store:promote_queued(chat, q, { prepare = true }))
        assert.are.equal("chatstream.Publish", getmetatable(p).__name)
        assert.are.equal("requires_action", status_of(store, chat)) -- not yet
        local ids = assert(p:commit())
        assert.are.equal(2, #ids)
        assert.are.equal("pending", status_of(store, chat))
        assert.are.same({}, ids_of(settle_events(sub, 0.1))) -- nothing published
        assert(p:cache(2))
        assert(p:notify(2))
        local evs = collect(sub, function(e) return #ids_of(e) >= 2 end)
        local got = ids_of(evs) -- the DB pass found message 1 (any order)
        table.sort(got)
        assert.are.same(ids, got)
        for _, m in ipairs(of_kind(evs, "message")) do
          if m.id == ids[1] then
            assert.are.equal(call, m.tool_call_id)
          end
        end
        assert(p:publish()) -- the rest: message 1, then status and queue
        evs = collect(sub, function(e) return last_status(e) ~= nil end)
        assert.are.equal("pending", last_status(evs).status)
        p:close()
        assert.are.equal(seen + 2, count_messages(store, chat))
      end)
    end)

    describe("interruptions and takeovers", function()
      it("a message sent while the worker is interrupted queues behind the promoted one", function()
        local chat = store:create_chat()
        store:send(chat, { content = "work" })
        store:acquire({ worker = "w1" })
        local first = store:send(chat, { content = "first" })
        assert.are.same({}, store:promote_queued(chat, first)) -- interrupts w1
        local second, queued = store:send(chat, { content = "second" })
        assert.is_true(queued)
        assert.are.same({ first, second }, { store:queued(chat)[1].id, store:queued(chat)[2].id })
        local _, final = assert(store:finish(chat, "waiting", { worker = "w1" }))
        assert.are.equal("pending", final)
        local hist = agent.history(store, chat)
        assert.are.equal("first", hist[#hist].content)
        assert.are.same({ second }, { store:queued(chat)[1].id })
      end)

      it("a message sent to a chat whose interrupted worker is gone promotes the head at once", function()
        local s = inst:open({ stale_after = 0.2 })
        local chat = s:create_chat()
        s:send(chat, { content = "work" })
        s:acquire({ worker = "w1" })
        local first = s:send(chat, { content = "first" })
        assert.are.same({}, s:promote_queued(chat, first))
        sleep(0.4) -- w1 never comes back
        local second, queued = s:send(chat, { content = "second" })
        assert.is_true(queued)
        assert.are.equal("pending", status_of(s, chat))
        local hist = agent.history(s, chat)
        assert.are.equal("first", hist[#hist].content)
        assert.are.same({ second }, { s:queued(chat)[1].id })
      end)

      it("an interrupted chat whose worker went silent is revived by the next acquire", function()
        local s = inst:open({ stale_after = 0.2 })
        local chat = s:create_chat()
        s:send(chat, { content = "work" })
        assert.are.same({ chat }, s:acquire({ worker = "w1" }))
        local q = s:send(chat, { content = "next" })
        assert.are.same({}, s:promote_queued(chat, q)) -- interrupts w1
        assert.are.same({}, s:acquire({ worker = "w2" })) -- w1 is fresh: not yet
        sleep(0.4) -- w1 dies without finishing
        assert.are.same({ chat }, s:acquire({ worker = "w2" }))
        local hist = agent.history(s, chat)
        assert.are.equal("next", hist[#hist].content)
        assert.are.equal("w2", s:chat(chat).worker)
        assert.are.same({}, s:queued(chat))
        assert(s:finish(chat, "waiting", { worker = "w2" }))
        -- with nothing queued, a silent interrupted worker's chat is released
        local other = s:create_chat()
        s:send(other, { content = "work" })
        assert.are.same({ other }, s:acquire({ worker = "w3" }))
        local q2 = s:send(other, { content = "q" })
        assert.are.same({}, s:promote_queued(other, q2))
        assert(s:delete_queued(other, q2))
        sleep(0.4)
        assert.are.same({}, s:acquire({ worker = "w4" }))
        local info = s:chat(other)
        assert.are.equal("waiting", info.status)
        assert.is_nil(info.worker)
      end)

      it("a worker that lost the chat cannot append, and its turn leaves the chat alone", function()
        local s = inst:open({ stale_after = 0.2 })
        local chat = s:create_chat()
        s:send(chat, { content = "work" })
        assert.are.same({ chat }, s:acquire({ worker = "w1" }))
        sleep(0.4)
        assert.are.same({ chat }, s:acquire({ worker = "w2" })) -- takeover
        local r, err, code = s:append(chat, { role = "assistant", content = "late" }, { worker = "w1" })
        assert.is_nil(r)
        assert.are.equal("ESTATE", code)
        H.contains("not running on worker w1", err)
        H.contains("chat " .. chat .. " is running", err)
        -- on a chat that is not running at all, and on no chat
        local idle = s:create_chat()
        r, err, code = s:append(idle, { role = "assistant", content = "x" }, { worker = "w1" })
        assert.is_nil(r)
        assert.are.equal("ESTATE", code)
        H.contains("chat " .. idle .. " is waiting, not running on worker w1", err)
        r, err, code = s:append(999999, { role = "assistant", content = "x" }, { worker = "w1" })
        assert.is_nil(r)
        assert.are.equal("ENOTFOUND", code, err)
        assert.are.equal(0, count_messages(s, idle))
        assert.are.equal("running", agent.turn(s, chat, { worker = "w1", stream = false }))
        assert.are.equal("w2", s:chat(chat).worker)
        assert.are.equal(1, count_messages(s, chat))
        assert(s:append(chat, { role = "assistant", content = "mine" }, { worker = "w2" }))
        local p = assert(s:prepare(chat, { role = "assistant", content = "x" }, { worker = "w1" }))
        r, _, code = p:commit()
        assert.is_nil(r)
        assert.are.equal("ESTATE", code)
        p:close()
        H.contains("exclude each other",
          H.raises(s.append, s, chat, { role = "user", content = "x" }, { worker = "w2", actor = "a" }))
      end)

      it("promote answers every open tool call of the turn, once each", function()
        local chat = store:create_chat()
        store:send(chat, { content = "go" })
        store:acquire({ worker = "w1" })
        store:append(chat, {
          { role = "assistant", content = "first", tool_calls = { "x", "y" } },
          { role = "tool", content = "y done", tool_call_id = "y" },
          { role = "assistant", content = "still thinking", tool_calls = { "z", "x" } },
        })
        assert(store:finish(chat, "requires_action", { worker = "w1" }))
        local q = store:send(chat, { content = "stop" })
        local ids = assert(store:promote_queued(chat, q))
        local hist = agent.history(store, chat)
        local added = {}
        for _, m in ipairs(hist) do
          if m.id >= ids[1] then
            added[#added + 1] = m.role .. ":" .. (m.tool_call_id or m.content)
          end
        end
        assert.are.same({ "tool:x", "tool:z", "user:stop" }, added)
        assert.are.same({}, agent.unresolved(hist))
      end)

      it("a stepped promote that inserts nothing notifies its status and queue at commit", function()
        local chat = store:create_chat()
        store:send(chat, { content = "work" })
        store:acquire({ worker = "w1" })
        local q1 = store:send(chat, { content = "q1" })
        local q2 = store:send(chat, { content = "q2" })
        local reader = inst:open()
        local sub <close> = assert(reader:subscribe(chat))
        settle_events(sub, 0)
        local p = assert(store:promote_queued(chat, q2, { prepare = true }))
        assert.are.same({}, assert(p:commit()))
        p:close() -- never notified by hand
        local evs = collect(sub, function(e) return last_status(e) and #of_kind(e, "queue") > 0 end)
        assert.are.equal("waiting", last_status(evs).status)
        local items = of_kind(evs, "queue")[1].items
        assert.are.same({ q2, q1 }, { items[1].id, items[2].id })
      end)

      it("long tool call lists round-trip exactly", function()
        local chat = store:create_chat()
        local calls = {}
        for i = 1, 7 do
          calls[i] = string.rep(string.char(96 + i), 128)
        end
        calls[8] = string.rep("h", 121)
        for i = 9, 64 do
          calls[i] = "call-" .. i
        end
        local id = store:append(chat, { role = "assistant", content = "many", tool_calls = calls })[1]
        local hist = agent.history(store, chat)
        assert.are.equal(id, hist[1].id)
        assert.are.same(calls, hist[1].tool_calls)
      end)
    end)

    describe("workers", function()
      it("acquire takes pending chats only, up to limit, and sets them running", function()
        local chats = {}
        for i = 1, 3 do
          chats[i] = store:create_chat()
          store:send(chats[i], { content = "go " .. i })
        end
        local idle = store:create_chat()
        local got = assert(store:acquire({ worker = "w1", limit = 2 }))
        assert.are.equal(2, #got)
        local more = assert(store:acquire({ worker = "w2", limit = 5 }))
        assert.are.equal(1, #more)
        assert.are.same({}, store:acquire({ worker = "w3" }))
        local all = { got[1], got[2], more[1] }
        table.sort(all)
        assert.are.same(chats, all)
        for _, c in ipairs(got) do
          local info = store:chat(c)
          assert.are.equal("running", info.status)
          assert.are.equal("w1", info.worker)
          assert.are.equal(2, info.version)
          assert.is_true(info.heartbeat_age >= 0 and info.heartbeat_age < 60)
        end
        assert.are.equal("waiting", status_of(store, idle))
      end)

      it("two stores acquiring at once never take the same chat", function()
        local other = inst:open()
        local chats = {}
        for i = 1, 20 do
          chats[i] = store:create_chat()
          store:send(chats[i], { content = "go" })
        end
        local taken = {}
        for round = 1, 20 do
          local s = round % 2 == 0 and store or other
          for _, c in ipairs(s:acquire({ worker = "w" .. round % 2, limit = 3 })) do
            assert.is_nil(taken[c])
            taken[c] = true
          end
        end
        for _, c in ipairs(chats) do
          assert.is_true(taken[c])
        end
      end)

      it("finish on waiting or completed promotes the queue's head; requires_action keeps the queue", function()
        local chat = store:create_chat()
        store:send(chat, { content = "go" })
        store:acquire({ worker = "w1" })
        local q1 = store:send(chat, { content = "next" })
        local q2 = store:send(chat, { content = "after" })
        local _, final = assert(store:finish(chat, "completed", { worker = "w1" }))
        assert.are.equal("pending", final)
        assert.are.same({ q2 }, { store:queued(chat)[1].id })
        assert.are.equal(q2, store:queued(chat)[1].id)
        local hist = agent.history(store, chat)
        assert.are.equal("next", hist[#hist].content)
        store:acquire({ worker = "w1" })
        _, final = assert(store:finish(chat, "requires_action", { worker = "w1" }))
        assert.are.equal("requires_action", final)
        assert.are.equal(1, #store:queued(chat))
        local _ = q1
      end)

      it("runs a Lua agent: client tool -> requires_action, text -> waiting, a server tool resolves itself", function()
        local chat = store:create_chat()
        local turns = {}
        local on_turn = function(c, final, ids) turns[#turns + 1] = { c, final, #ids } end
        store:send(chat, { content = "/tool weather" })
        assert.are.equal(1, agent.run(store, { worker = "w1", idle = 0, stream = false, on_turn = on_turn }))
        assert.are.same({ chat, "requires_action", 1 }, turns[1])
        local hist = agent.history(store, chat)
        assert.are.same({ "call-" .. hist[1].id }, hist[2].tool_calls)
        -- the client answers by sending: queued, then promoted
        local q = store:send(chat, { content = "/calc 6*7" })
        assert(store:promote_queued(chat, q))
        assert.are.equal(1, agent.run(store, { worker = "w1", idle = 0, on_turn = on_turn }))
        assert.are.same({ chat, "waiting", 3 }, turns[2])
        hist = agent.history(store, chat)
        local roles = {}
        for _, m in ipairs(hist) do
          roles[#roles + 1] = m.role
        end
        assert.are.same({ "user", "assistant", "tool", "user", "assistant", "tool", "assistant" }, roles)
        assert.are.equal("the answer is 42", hist[#hist].content)
        assert.are.same({}, agent.unresolved(hist))
        store:send(chat, { content = "thanks" })
        assert.are.equal(1, agent.run(store, { worker = "w1", idle = 0, turns = 1 }))
        hist = agent.history(store, chat)
        assert.are.equal("reply to: thanks", hist[#hist].content)
        assert.are.equal("waiting", status_of(store, chat))
      end)
    end)

    describe("parts", function()
      it("reach every subscriber of the chat, in other stores too, and are not durable", function()
        local chat = store:create_chat()
        local other = inst:open()
        local sub <close> = assert(other:subscribe(chat))
        settle_events(sub, 0)
        assert(store:publish_part(chat, "Hel"))
        assert(store:publish_part(chat, "lo ✓"))
        local evs = collect(sub, function(e) return #of_kind(e, "part") >= 2 end)
        local parts = of_kind(evs, "part")
        assert.are.same({ "Hel", "lo ✓" }, { parts[1].text, parts[2].text })
        assert.are.equal(0, parts[1].after)
        assert.are.equal(2, other:stats().parts)
        assert.are.equal(0, count_messages(store, chat))
      end)

      it("split a long text on character boundaries and under the payload limit", function()
        local chat = store:create_chat()
        local sub <close> = assert(store:subscribe(chat))
        settle_events(sub, 0)
        local text = string.rep("añ€😀", 2000) .. "end" -- 20003 bytes, multi-byte
        assert(store:publish_part(chat, text))
        local evs = collect(sub, function(e)
          local got = {}
          for _, p in ipairs(of_kind(e, "part")) do
            got[#got + 1] = p.text
          end
          return table.concat(got) == text
        end)
        local parts = of_kind(evs, "part")
        assert.is_true(#parts >= 3)
        local got = {}
        for _, p in ipairs(parts) do
          assert.is_true(#p.text < 8000)
          assert.is_truthy(utf8.len(p.text)) -- each one valid UTF-8
          got[#got + 1] = p.text
        end
        assert.are.equal(text, table.concat(got))
      end)

      it("of the turn in progress reach a late joiner in any store first (as one), then the live ones", function()
        local chat = store:create_chat()
        assert(store:send(chat, { content = "work" }))
        assert.are.same({ chat }, store:acquire({ worker = "w1" }))
        assert(store:publish_part(chat, "Hel"))
        assert(store:publish_part(chat, "lo"))
        local late = inst:open() -- another store: another process's view
        local sub <close> = assert(late:subscribe(chat))
        local evs = settle_events(sub, 0)
        local kinds = {}
        for _, ev in ipairs(evs) do
          kinds[#kinds + 1] = ev.kind
        end
        assert.are.same({ "status", "message", "part" }, kinds)
        assert.are.same({ "Hello", 1 }, { evs[3].text, evs[3].after }) -- the turn's text so far
        assert(store:publish_part(chat, "!"))
        local more = collect(sub, function(e) return #of_kind(e, "part") >= 1 end)
        assert.are.same({ "!" }, { of_kind(more, "part")[1].text })
        assert.are.same({}, of_kind(settle_events(sub, 0.2), "part")) -- none twice
        -- many parts (more than a subscription's queue holds): all of them
        local big = inst:open({ queue_size = 8 })
        local many = {}
        for i = 1, 40 do
          many[i] = "p" .. i .. " "
          assert(store:publish_part(chat, many[i]))
        end
        local bsub <close> = assert(big:subscribe(chat))
        local btexts = {}
        for _, ev in ipairs(of_kind(settle_events(bsub, 0.1), "part")) do
          btexts[#btexts + 1] = ev.text
        end
        assert.are.same({ "Hello!" .. table.concat(many) }, btexts)
        -- a joiner on the writer's own store too
        local own <close> = assert(store:subscribe(chat))
        local texts = {}
        for _, ev in ipairs(of_kind(settle_events(own, 0.1), "part")) do
          texts[#texts + 1] = ev.text
        end
        assert.are.same({ "Hello!" .. table.concat(many) }, texts)
        -- once the turn's message commits, its parts are history: never replayed
        assert(store:append(chat, { role = "assistant", content = "Hello!" }, { worker = "w1" }))
        assert(store:finish(chat, "waiting", { worker = "w1" }))
        local after <close> = assert(inst:open():subscribe(chat))
        assert.are.same({}, of_kind(settle_events(after, 0.1), "part"))
        -- and the next turn's parts are the only ones a joiner gets
        assert(store:publish_part(chat, "next"))
        local next_sub <close> = assert(inst:open():subscribe(chat))
        texts = {}
        for _, ev in ipairs(of_kind(settle_events(next_sub, 0.1), "part")) do
          texts[#texts + 1] = ev.text
        end
        assert.are.same({ "next" }, texts)
      end)

      it("of a message committed since are not replayed to a late subscriber", function()
        local chat = store:create_chat()
        local early = inst:open()
        local sub1 <close> = assert(early:subscribe(chat))
        settle_events(sub1, 0)
        assert(store:publish_part(chat, "draft"))
        local id = store:append(chat, { role = "assistant", content = "draft" })[1]
        local late = inst:open()
        local sub2 <close> = assert(late:subscribe(chat))
        assert(store:publish_part(chat, "next one"))
        local evs1 = collect(sub1, function(e) return #of_kind(e, "part") >= 2 end)
        local evs2 = collect(sub2, function(e) return #of_kind(e, "part") >= 1 end)
        assert.are.same({ "draft", "next one" }, { of_kind(evs1, "part")[1].text, of_kind(evs1, "part")[2].text })
        local p2 = of_kind(evs2, "part")
        assert.are.equal(1, #p2)
        assert.are.equal("next one", p2[1].text)
        assert.are.equal(id, p2[1].after)
        assert.are.same({ id }, ids_of(evs2))
      end)

      it("a part of a message the reader already has is dropped", function()
        local chat = store:create_chat()
        local reader = inst:open()
        local early <close> = assert(reader:subscribe(chat))
        settle_events(early, 0)
        local before = reader:stats().notifications
        assert(store:publish_part(chat, "draft")) -- after = 0: for the next message
        local id = store:append(chat, { role = "assistant", content = "draft" })[1]
        chatstream.sleep(0.3) -- both notifications reach the reader's connection
        -- nothing has routed them yet: the next subscription exists when they are
        assert.are.equal(before, reader:stats().notifications)
        local late <close> = assert(reader:subscribe(chat)) -- its snapshot has the message
        local late_evs = settle_events(late, 0.2)
        assert.are.equal(before + 2, reader:stats().notifications)
        assert.are.same({ id }, ids_of(late_evs))
        assert.are.same({}, of_kind(late_evs, "part")) -- stale for it: dropped
        local early_evs = collect(early, function(e) return #ids_of(e) == 1 end)
        local parts = of_kind(early_evs, "part")
        assert.are.equal(1, #parts) -- the early reader gets it, before the message
        assert.are.same({ "draft", 0 }, { parts[1].text, parts[1].after })
        assert.are.equal("part", early_evs[1].kind)
        assert.are.equal(1, reader:stats().parts)
      end)

      it("a slow reader loses parts (counted), never messages", function()
        local chat = store:create_chat()
        local reader = inst:open({ queue_size = 4 })
        local sub <close> = assert(reader:subscribe(chat))
        settle_events(sub, 0)
        local ids = {}
        for i = 1, 12 do
          assert(store:publish_part(chat, "p" .. i))
          if i % 4 == 0 then
            ids[#ids + 1] = store:append(chat, { role = "assistant", content = "m" .. i })[1]
          end
        end
        H.settle(reader, 15)
        local evs = settle_events(sub, 0.2)
        assert.are.same(ids, ids_of(evs))
        local st = reader:stats()
        assert.is_true(st.parts_dropped > 0)
        assert.are.equal(#of_kind(evs, "part"), st.parts)
        assert.is_true(st.parts + st.parts_dropped <= 12)
      end)
    end)

    describe("authorization", function()
      it("refuses a subscription of another actor before reading anything", function()
        local chat = store:create_chat({ owner = "alice" })
        store:append(chat, { role = "user", content = "secret" })
        local before = store:stats()
        local sub, err, code = store:subscribe(chat, { actor = "mallory" })
        assert.is_nil(sub)
        assert.are.equal("EAUTH", code)
        H.contains("EAUTH: mallory may not subscribe (chat " .. chat .. ")", err)
        local after = store:stats()
        assert.are.equal(before.queries, after.queries) -- no data read
        assert.are.equal(before.auth_refusals + 1, after.auth_refusals)
        local allowed <close> = assert(store:subscribe(chat, { actor = "alice" }))
        assert.are.equal("status", allowed:next(0).kind)
        assert.is_true(store:stats().queries > after.queries)
      end)

      it("refuses every writing operation of another actor, writing nothing", function()
        local chat = store:create_chat({ owner = "alice" })
        store:send(chat, { content = "go", actor = "alice" })
        local q = store:send(chat, { content = "queued", actor = "alice" })
        local m = { actor = "mallory" }
        local calls = {
          function() return store:send(chat, { content = "x", actor = "mallory" }) end,
          function() return store:append(chat, { role = "user", content = "x" }, m) end,
          function() return store:prepare(chat, { role = "user", content = "x" }, m) end,
          function() return store:queued(chat, m) end,
          function() return store:delete_queued(chat, q, m) end,
          function() return store:move_queued(chat, q, m) end,
          function() return store:promote_queued(chat, q, m) end,
          function() return store:publish_part(chat, "x", m) end,
          function() return store:finish(chat, "waiting", m) end,
          function() return store:chat(chat, m) end,
        }
        local v = store:chat(chat).version
        for i, f in ipairs(calls) do
          local r, err, code = f()
          assert.is_nil(r, "call " .. i)
          assert.are.equal("EAUTH", code, "call " .. i)
          H.contains("mallory may not", err)
        end
        assert.are.equal(1, count_messages(store, chat))
        assert.are.equal(1, #store:queued(chat))
        assert.are.equal(v, store:chat(chat).version)
        assert.are.equal(#calls, store:stats().auth_refusals)
        assert(store:queued(chat, { actor = "alice" }))
      end)

      it("does not tell an actor whether a chat exists", function()
        local r, err, code = store:subscribe(424242, { actor = "mallory" })
        assert.is_nil(r)
        assert.are.equal("EAUTH", code)
        H.contains("mallory may not subscribe (chat 424242)", err)
        r, _, code = store:subscribe(424242)
        assert.is_nil(r)
        assert.are.equal("ENOTFOUND", code)
      end)

      it("an authorizer cannot close its own store", function()
        local s
        s = inst:open({ authorize = function() s:close() return true end })
        local chat = s:create_chat({ owner = "alice" })
        local r, err, code = s:send(chat, { content = "x", actor = "alice" })
        assert.is_nil(r)
        assert.are.equal("EAUTH", code)
        H.contains("attempt to close a store inside its authorizer", err)
        assert(s:send(chat, { content = "trusted" })) -- still open
      end)

      it("asks the authorizer given to open instead of the owner rule", function()
        local asked = {}
        local s = inst:open({
          authorize = function(actor, chat, op)
            asked[#asked + 1] = { actor, chat.id, chat.owner, op }
            if actor == "boom" then
              error("authorizer broke")
            end
            if actor == "bob" and op == "subscribe" then
              return true
            end
            return false, "read-only friend"
          end,
        })
        local chat = s:create_chat({ owner = "alice", title = "t" })
        local sub <close> = assert(s:subscribe(chat, { actor = "bob" }))
        assert.are.equal("status", sub:next(0).kind)
        local r, err, code = s:send(chat, { content = "x", actor = "bob" })
        assert.is_nil(r)
        assert.are.equal("EAUTH", code)
        H.contains("bob may not send (chat " .. chat .. "): read-only friend", err)
        -- the owner rule is replaced, not added to
        r, _, code = s:send(chat, { content = "x", actor = "alice" })
        assert.is_nil(r)
        assert.are.equal("EAUTH", code)
        -- an authorizer that raises refuses (fail closed)
        r, err, code = s:subscribe(chat, { actor = "boom" })
        assert.is_nil(r)
        assert.are.equal("EAUTH", code)
        H.contains("authorizer broke", err)
        assert.are.same({ "bob", chat, "alice", "subscribe" }, asked[1])
        assert.are.same({ "bob", chat, "alice", "send" }, asked[2])
        -- trusted code (no actor) is not asked
        local n = #asked
        assert(s:send(chat, { content = "trusted" }))
        assert.are.equal(n, #asked)
      end)
    end)

    describe("bad input", function()
      it("raises on malformed arguments and returns EINVAL for bad values", function()
        local chat = store:create_chat()
        H.contains("send takes a user message",
          H.raises(store.send, store, chat, { role = "assistant", content = "x" }))
        H.contains("content", H.raises(store.send, store, chat, {}))
        H.contains("unknown option", H.raises(store.send, store, chat, { content = "x", bogus = 1 }))
        H.contains("option 'worker' is required", H.raises(store.acquire, store, {}))
        H.contains("limit", H.raises(store.acquire, store, { worker = "w", limit = 0 }))
        H.contains("status must be", H.raises(store.finish, store, chat, "sleeping"))
        H.contains("only an assistant message has tool_calls",
          H.raises(store.append, store, chat, { role = "user", content = "x", tool_calls = { "a" } }))
        H.contains("only a tool message has a tool_call_id",
          H.raises(store.append, store, chat, { role = "assistant", content = "x", tool_call_id = "a" }))
        H.contains("tool call ID",
          H.raises(store.append, store, chat, { role = "assistant", content = "x", tool_calls = { "bad id" } }))
        H.contains("tool call ID",
          H.raises(store.append, store, chat, { role = "tool", content = "x", tool_call_id = "" }))
        H.contains("tool call ID",
          H.raises(store.append, store, chat, { role = "tool", content = "x", tool_call_id = "a b" }))
        H.contains("tool call ID",
          H.raises(store.append, store, chat,
            { role = "assistant", content = "x", tool_calls = { string.rep("i", 129) } }))
        local long = {}
        for i = 1, 65 do
          long[i] = "c" .. i
        end
        H.contains("at most 64",
          H.raises(store.append, store, chat, { role = "assistant", content = "x", tool_calls = long }))
        local r, err, code = store:create_chat({ owner = string.rep("o", 256) })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        H.contains("owner", err)
        r, _, code = store:send(99999, { content = "x" })
        assert.is_nil(r)
        assert.are.equal("ENOTFOUND", code)
        r, _, code = store:publish_part(chat, "a\0b")
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        r, _, code = store:subscribe(chat, { actor = "" })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        assert.are.equal(0, count_messages(store, chat))
      end)
    end)
  end)
end)

-- The seed's race with lifecycle operations, in one process and stepped:
-- promote commits (tool result, user message) and sets pending; a worker on
-- the reader's store acquires and appends its reply, cached and notified
-- before the promoted messages are published. last_id must lose them (proof
-- that the spec hits the race); the others deliver all three exactly once.
describe("promote/resume race, stepped", function()
  H.each_backend(_ENV, function(kind)
    for _, strategy in ipairs({ "last_id", "rescan", "watermark", "ordered" }) do
      it("under " .. strategy, function()
        H.with_instance(kind, function(inst)
          local api = inst:open() -- where promote runs
          local hub = inst:open() -- the worker and the reader share this one
          local chat = hub:create_chat()
          hub:send(chat, { content = "/tool" })
          hub:acquire({ worker = "w" })
          agent.turn(hub, chat, { worker = "w", stream = false })
          local q = api:send(chat, { content = "go on" })
          local opts = { after = hub:chat(chat).last_message_id }
          if strategy == "ordered" then
            opts.strategy, opts.ordered = "watermark", true
          else
            opts.strategy = strategy
          end
          local sub <close> = assert(hub:subscribe(chat, opts))
          local got = ids_of(settle_events(sub, 0))
          assert.are.same({}, got)
          local p = assert(api:promote_queued(chat, q, { prepare = true }))
          local promoted = assert(p:commit())
          assert.are.same({ chat }, hub:acquire({ worker = "w" }))
          local reply = hub:append(chat, { role = "assistant", content = "resumed" })
          assert(hub:finish(chat, "waiting", { worker = "w" }))
          -- the reader merges the reply's notification (status ones too)
          local evs = collect(sub, function(e) return last_status(e) and last_status(e).status == "waiting" end)
          for _, id in ipairs(ids_of(evs)) do
            got[#got + 1] = id
          end
          assert(p:publish()) -- the promoted messages are published last
          p:close()
          local n = hub:stats().notifications
          H.settle(hub, n + 4) -- 2 messages, status, queue
          for _, id in ipairs(ids_of(settle_events(sub, 0.1))) do
            got[#got + 1] = id
          end
          local lost, dups = H.check(got, { promoted[1], promoted[2], reply[1] })
          assert.are.same({}, dups)
          if strategy == "last_id" then
            assert.are.same({ promoted[1], promoted[2] }, lost)
          else
            assert.are.same({}, lost)
            if strategy == "ordered" then
              assert.are.same({ promoted[1], promoted[2], reply[1] }, got)
            end
          end
          local _ = chatstream
        end)
      end)
    end
  end)
end)
