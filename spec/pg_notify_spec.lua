-- spec/pg_notify_spec.lua - notifications that carry their message. On the
-- PostgreSQL store a plain append is one statement, and the notification it
-- queues for its commit carries the message itself when it fits ("1:M"
-- hints): readers in other stores (other processes) cache it from there and
-- deliver it with no query. Bigger messages, stepped publishes and
-- lifecycle writes send the plain hint, and readers query for them.
-- PostgreSQL only (CHATSTREAM_TEST_DSN).
local H = require("helpers")
local chatstream = require("chatstream")

-- Content and tool bytes that still fit a notification with the message
-- (CS_PAYLOAD_MAX 7999 minus CS_BODY_HEAD 60, core/src/internal.h).
local BODY_MAX = 7939

-- The next `want` message events of sub (each waited for up to `limit` s).
local function read_messages(sub, want, limit)
  local got = {}
  for _ = 1, want do
    local ev = H.next_message(sub, limit or 5)
    if not ev then
      break
    end
    got[#got + 1] = ev
  end
  return got
end

-- The fields a reader sees of a message event.
local function fields(ev)
  return {
    id = ev.id,
    role = ev.role,
    content = ev.content,
    tool_calls = ev.tool_calls,
    tool_call_id = ev.tool_call_id,
  }
end

-- The chat's messages from the database (a fresh store's snapshot), by id.
local function truth(inst, chat)
  local store = inst:open()
  local sub = assert(store:subscribe(chat))
  local out = {}
  for ev in sub:events(0) do
    if ev.kind == "message" then
      out[#out + 1] = fields(ev)
    end
  end
  sub:close()
  store:close()
  return out
end

describe("notifications that carry their message (PostgreSQL)", function()
  if not H.require_pg(_ENV) then
    return
  end

  it("readers in another store deliver plain appends with no query, exactly as stored", function()
    H.with_instance("postgresql", function(inst)
      -- rescan and last_id (the reference's strategies, which query on
      -- notifications the cache has already answered) in a store of their own
      local writer, reader, ref_reader = inst:open(), inst:open(), inst:open()
      local chat = assert(writer:create_chat({ owner = "alice", title = "bodies" }))
      local subs = {
        watermark = assert(reader:subscribe(chat)),
        ordered = assert(reader:subscribe(chat, { ordered = true })),
        rescan = assert(ref_reader:subscribe(chat, { strategy = "rescan" })),
        last_id = assert(ref_reader:subscribe(chat, { strategy = "last_id" })),
      }
      for _, sub in pairs(subs) do
        assert.are.same({}, H.drain(sub)) -- the snapshot: the status only
      end
      local q0 = reader:stats().queries
      local rq0 = ref_reader:stats().queries
      local sent = {
        { role = "user", content = "plain" },
        { role = "user", content = "colons 1:m:4:5 and 1:M:1:2:user:0: inside" },
        {
          role = "assistant",
          content = "lines\nand\ttabs \u{e9}\u{4e2d}\u{1f600}",
          tool_calls = { "call_1", "call:2" },
        },
        { role = "tool", content = "42", tool_call_id = "call:2" },
        { role = "tool", content = "", tool_call_id = "call_1" },
        { role = "system", content = string.rep("x", BODY_MAX) }, -- the largest that travels
      }
      for _, m in ipairs(sent) do
        assert(writer:append(chat, m))
      end
      local want = truth(inst, chat)
      assert.are.equal(#sent, #want)
      for name, sub in pairs(subs) do
        local got = {}
        for i, ev in ipairs(read_messages(sub, #sent)) do
          got[i] = fields(ev)
        end
        assert.are.same(want, got, name)
      end
      local st = reader:stats()
      -- Every message came in its notification: no query, nothing malformed.
      assert.are.equal(#sent, st.bodies)
      assert.are.equal(q0, st.queries)
      assert.are.equal(0, st.malformed)
      assert.are.equal(#sent, st.notifications)
      -- rescan's pass per notification stays (the reference's rule).
      assert.is_true(ref_reader:stats().queries - rq0 >= #sent)
      -- The writer's own hub got no notification for its own appends.
      assert.are.equal(0, writer:stats().notifications)
      for _, sub in pairs(subs) do
        sub:close()
      end
    end)
  end)

  it("keeps in a reader's cache only what one of its subscriptions has not read yet", function()
    H.with_instance("postgresql", function(inst)
      local writer, reader = inst:open(), inst:open()
      local chat = assert(writer:create_chat({ owner = "alice", title = "window" }))
      local fast, slow = assert(reader:subscribe(chat)), assert(reader:subscribe(chat))
      H.drain(fast)
      H.drain(slow)
      local q0 = reader:stats().queries
      local ids = {}
      for i = 1, 30 do
        ids[i] = assert(writer:append(chat, { role = "user", content = "m" .. i }))[1]
        local ev = H.next_message(fast, 3)
        assert.are.equal(ids[i], ev and ev.id)
      end
      -- slow has read nothing: every message stays cached for it
      assert.are.equal(30, reader:stats().cached_messages)
      local got = {}
      for i = 1, 30 do
        local ev = H.next_message(slow, 3)
        got[i] = ev and ev.id
      end
      assert.are.same(ids, got)
      assert.are.equal(q0, reader:stats().queries) -- all from the cache
      -- both have read everything: the next carried message evicts the rest
      local last = assert(writer:append(chat, { role = "user", content = "last" }))[1]
      assert.are.equal(last, H.next_message(fast, 3).id)
      assert.are.equal(last, H.next_message(slow, 3).id)
      assert.is_true(reader:stats().cached_messages <= 1, reader:stats().cached_messages .. " cached")
      assert.are.equal(q0, reader:stats().queries)
      fast:close()
      slow:close()
    end)
  end)

  it("carries a worker's fenced append too", function()
    H.with_instance("postgresql", function(inst)
      local worker, reader = inst:open(), inst:open()
      local chat = assert(worker:create_chat({ owner = "alice", title = "worker" }))
      assert(worker:send(chat, { content = "do it" }))
      assert.are.same({ chat }, worker:acquire({ worker = "w1" }))
      local sub = assert(reader:subscribe(chat))
      H.drain(sub)
      local q0, b0 = reader:stats().queries, reader:stats().bodies
      local id = assert(worker:append(chat, { role = "assistant", content = "done" }, { worker = "w1" }))[1]
      local ev = H.next_message(sub, 3)
      assert.are.equal(id, ev and ev.id)
      assert.are.equal("done", ev.content)
      assert.are.equal(b0 + 1, reader:stats().bodies)
      assert.are.equal(q0, reader:stats().queries)
      sub:close()
    end)
  end)

  it("sends a plain hint for a message too big to carry, and readers query for it", function()
    H.with_instance("postgresql", function(inst)
      local writer, reader = inst:open(), inst:open()
      local chat = assert(writer:create_chat({ owner = "alice", title = "big" }))
      local sub = assert(reader:subscribe(chat))
      H.drain(sub)
      local q0 = reader:stats().queries
      local big = string.rep("\u{e9}", (BODY_MAX + 1) // 2) -- one byte over (2-byte characters)
      assert.are.equal(BODY_MAX + 1, #big)
      local id = assert(writer:append(chat, { role = "user", content = big }))[1]
      local got = read_messages(sub, 1)
      assert.are.equal(1, #got)
      assert.are.equal(id, got[1].id)
      assert.are.equal(big, got[1].content)
      local st = reader:stats()
      assert.are.equal(0, st.bodies)
      assert.are.equal(q0 + 1, st.queries)
      -- a tool field counts toward the limit too
      local tool = string.rep("c", 64)
      id = assert(writer:append(chat, {
        role = "assistant",
        content = string.rep("y", BODY_MAX - #tool + 1),
        tool_calls = { tool },
      }))[1]
      got = read_messages(sub, 1)
      assert.are.equal(id, got[1].id)
      assert.are.same({ tool }, got[1].tool_calls)
      assert.are.equal(0, reader:stats().bodies)
      assert.are.equal(q0 + 2, reader:stats().queries)
      sub:close()
    end)
  end)

  it("sends plain hints from a store opened with notify_bodies = false", function()
    H.with_instance("postgresql", function(inst)
      local writer, reader = inst:open({ notify_bodies = false }), inst:open()
      local chat = assert(writer:create_chat({ owner = "alice", title = "plain" }))
      local sub = assert(reader:subscribe(chat))
      H.drain(sub)
      local q0 = reader:stats().queries
      local ids = {}
      for i = 1, 3 do
        ids[i] = assert(writer:append(chat, { role = "user", content = "secret " .. i }))[1]
      end
      local got = {}
      for i, ev in ipairs(read_messages(sub, 3)) do
        got[i] = ev.id
      end
      assert.are.same(ids, got)
      -- (a DB pass may have found a message before its own notification came)
      local st = H.settle(reader, 3)
      assert.are.equal(0, st.bodies)
      assert.is_true(st.queries > q0)
      assert.are.equal(3, st.notifications)
      sub:close()
    end)
  end)

  it("reads the listener once for a loop over many subscriptions, and always when a call may wait", function()
    H.with_instance("postgresql", function(inst)
      local writer, reader = inst:open(), inst:open()
      local chat = assert(writer:create_chat({ owner = "alice", title = "many" }))
      local subs = {}
      for i = 1, 50 do
        subs[i] = assert(reader:subscribe(chat))
        H.drain(subs[i])
      end
      -- 50 non-waiting calls in a row: the listener is read at most once
      -- per millisecond, not once per call
      local s0 = reader:stats().steps
      local t0 = chatstream.now()
      for _, sub in ipairs(subs) do
        assert.is_nil(sub:next(0))
      end
      local took_ms = (chatstream.now() - t0) * 1000
      local reads = reader:stats().steps - s0
      assert.is_true(reads <= math.ceil(took_ms) + 1, reads .. " reads in " .. took_ms .. " ms")
      assert.is_true(reads < 50, reads .. " reads for 50 calls")
      -- A call that may wait reads it at once, however recent the last read:
      -- the message arrives within the call.
      local id = assert(writer:append(chat, { role = "user", content = "now" }))[1]
      local ev = H.next_message(subs[1], 3)
      assert.are.equal(id, ev and ev.id)
      -- and a non-waiting call after the gap reads it too
      chatstream.sleep(0.05)
      local id2 = assert(writer:append(chat, { role = "user", content = "later" }))[1]
      local got
      for _ = 1, 200 do
        chatstream.sleep(0.005)
        local e = subs[2]:next(0)
        while e and e.kind ~= "message" do
          e = subs[2]:next(0)
        end
        if e and e.id == id2 then
          got = e
          break
        end
      end
      assert.is_table(got, "a non-waiting call never read the listener")
      for _, sub in ipairs(subs) do
        sub:close()
      end
    end)
  end)

  it("keeps a stepped publish's notification separate (its own step, a plain hint)", function()
    H.with_instance("postgresql", function(inst)
      local writer, reader = inst:open(), inst:open()
      local chat = assert(writer:create_chat({ owner = "alice", title = "stepped" }))
      local sub = assert(reader:subscribe(chat))
      H.drain(sub)
      local p = assert(writer:prepare(chat, { role = "user", content = "stepped" }))
      local ids = assert(p:commit())
      p:cache()
      -- Committed, not notified: the reader hears nothing.
      reader:step(0.3)
      assert.are.equal(0, reader:stats().notifications)
      assert.is_nil(sub:next(0))
      p:notify()
      local got = read_messages(sub, 1)
      assert.are.equal(ids[1], got[1].id)
      local st = reader:stats()
      assert.are.equal(1, st.notifications)
      assert.are.equal(0, st.bodies)
      assert.is_true(st.queries >= 1)
      sub:close()
    end)
  end)
end)
