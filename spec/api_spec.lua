-- spec/api_spec.lua - the Lua API contract (DESIGN.md section 7), on every
-- store of the matrix (spec/helpers.lua): the Store, Publish and Subscription
-- tests run on the memory store and on PostgreSQL. Module-level option checks
-- and the memory fault knobs need no server and run once.
local chatstream = require("chatstream")
local H = require("helpers")

local STAT_KEYS = {
  "notifications", "malformed", "queries", "query_errors", "writes",
  "publish_errors", "cache_hits", "cache_misses", "db_passes", "delivered",
  "resyncs", "reconnects", "polls", "cached_chats",
  "parts", "parts_dropped", "auth_checks", "auth_refusals", "shared_passes",
  "bodies", "steps", "cached_messages", "warnings", "listener_deaf",
  "truncates", "cut_reads", "cut_refused",
}

local raises, contains = H.raises, H.contains
local status_event, after_status = H.status_event, H.after_status

local function msg(role, content)
  return { role = role, content = content }
end

-- Reads every event available now (non-blocking) and returns them.
local function read_all(sub)
  local evs = {}
  for ev in sub:events(0) do
    evs[#evs + 1] = ev
  end
  return evs
end

local function ids_of(evs)
  local ids = {}
  for i, ev in ipairs(evs) do
    ids[i] = ev.id
  end
  return ids
end

-- Waits until the store's hub has received n notifications in all, so that a
-- non-blocking read that follows sees every live event. On PostgreSQL they
-- arrive asynchronously; the memory store delivers them at once and the read
-- steps the hub itself, as it always did, so there it does nothing.
local function settle(store, n)
  if store:kind() ~= "memory" then
    H.settle(store, n)
  end
end

-- Steps the hub until it has received n notifications and returns the sum of
-- what step() said it received. Memory: one step() gets them all (they are
-- there at once). PostgreSQL: they arrive asynchronously, over steps that wait
-- for the listener (a step returns as soon as some are there).
local function step_for(store, n)
  if store:kind() == "memory" then
    return store:step()
  end
  local got, deadline = 0, os.time() + 10
  while got < n and os.time() <= deadline do
    local k = store:step(0.5)
    assert.are.equal("integer", math.type(k))
    got = got + k
  end
  return got
end

-- How long a read waits for an event that must come: the memory store answers
-- at once (nothing can arrive while it waits), PostgreSQL when it is there.
local LIVE = 5

describe("chatstream module", function()
  it("sleep(s) sleeps that long, and refuses nonsense", function()
    local t = chatstream.now()
    chatstream.sleep(0.05)
    local dt = chatstream.now() - t
    assert.is_true(dt >= 0.049 and dt < 1, tostring(dt))
    H.contains("seconds must be 0 to 86400", H.raises(chatstream.sleep, -1))
    H.contains("number expected", H.raises(chatstream.sleep, "x"))
  end)

  it("now() is the wall clock in seconds, finer than os.time()", function()
    local a = chatstream.now()
    assert.is_true(math.abs(a - os.time()) < 2)
    local b
    repeat
      b = chatstream.now()
    until b ~= a
    assert.is_true(b > a and b - a < 0.5)
    assert.are_not.equal(math.floor(a), a) -- has a fraction (almost surely)
  end)

  it("has a string _VERSION", function()
    assert.are.equal("string", type(chatstream._VERSION))
    assert.truthy(chatstream._VERSION:match("^%d+%.%d+%.%d+"))
  end)

  it("opens an embedded store with no argument", function()
    local store = chatstream.open()
    assert.are.equal("userdata", type(store))
    assert.are.equal("chatstream.Store", getmetatable(store).__name)
    store:close()
  end)

  it("opens an embedded store with an options table", function()
    local store = chatstream.open({
      cache_size = 8, queue_size = 4, poll_interval = 0.5,
      authorize = function() return true end,
    })
    assert.are.equal("chatstream.Store", getmetatable(store).__name)
    local chat = store:create_chat()
    assert.are.equal("integer", math.type(chat))
    store:close()
    assert.are.equal("chatstream.Store", getmetatable(chatstream.open({})).__name)
  end)

  it("returns nil, EBACKEND for a server that is not there, without the password", function()
    -- Port 1 on loopback: nothing listens there.
    local dsn = "postgresql://someone:s3cr3t-pw@127.0.0.1:1/x?connect_timeout=2"
    local n = select("#", chatstream.open(dsn))
    local store, err, code = chatstream.open(dsn)
    assert.are.equal(3, n)
    assert.is_nil(store)
    assert.truthy(err:find("^EBACKEND: ."))
    assert.is_nil(err:find("s3cr3t-pw", 1, true))
    assert.are.equal("EBACKEND", code)
    store, err, code = chatstream.open({ dsn = "host=127.0.0.1 port=1 password=s3cr3t-pw connect_timeout=2" })
    assert.is_nil(store)
    assert.is_nil(err:find("s3cr3t-pw", 1, true))
    assert.are.equal("EBACKEND", code)
  end)

  it("returns nil, EINVAL for a DSN libpq cannot parse", function()
    local store, err, code = chatstream.open({ dsn = "host = = nope" })
    assert.is_nil(store)
    assert.truthy(err:find("^EINVAL: ."))
    assert.are.equal("EINVAL", code)
  end)

  it("refuses a schema name that is not a plain identifier, before connecting", function()
    for _, bad in ipairs({ "Bad", "a-b", "1x", "a;drop", "", string.rep("a", 63) }) do
      local store, err, code = chatstream.open({ dsn = "host=127.0.0.1 port=1", schema = bad })
      assert.is_nil(store)
      assert.truthy(err:find("schema"), err)
      assert.are.equal("EINVAL", code)
    end
  end)

  it("raises when dsn and memory are both given", function()
    contains("exclude each other", raises(chatstream.open, { dsn = "host=x", memory = chatstream.memory() }))
  end)

  it("formats status events with their recorded error and archived flag", function()
    assert.are.equal("status error (version 3), archived: the model timed out",
      chatstream.format_event({ kind = "status", status = "error", version = 3, archived = true,
        error = "the model timed out" }))
    assert.are.equal("status waiting (version 0)", chatstream.format_event({ kind = "status", status = "waiting",
      version = 0 }))
  end)

  it("formats a truncate event", function()
    assert.are.equal("truncate: every message above 4 is gone (edit 2)",
      chatstream.format_event({ kind = "truncate", after = 4, history = 2, chat_id = 1, cursor = 4 }))
  end)

  it("raises on an unknown option key", function()
    contains("unknown option 'bogus'", raises(chatstream.open, { bogus = 1 }))
    contains("unknown option", raises(chatstream.open, { [1] = "x" }))
  end)

  it("raises on an argument that is not nil, a string or a table", function()
    contains("bad argument #1 to 'open'", raises(chatstream.open, 42))
  end)

  it("raises on bad option types and ranges", function()
    contains("cache_size", raises(chatstream.open, { cache_size = 0 }))
    contains("cache_size", raises(chatstream.open, { cache_size = "x" }))
    contains("cache_size", raises(chatstream.open, { cache_size = 1.5 }))
    contains("queue_size", raises(chatstream.open, { queue_size = -1 }))
    contains("poll_interval", raises(chatstream.open, { poll_interval = -1 }))
    contains("poll_interval", raises(chatstream.open, { poll_interval = "soon" }))
    contains("authorize", raises(chatstream.open, { authorize = 5 }))
    contains("option 'memory' must be a chatstream.MemoryDB", raises(chatstream.open, { memory = "x" }))
    contains("cache_size", raises(chatstream.open, { cache_size = "5" }))
    contains("schema", raises(chatstream.open, { schema = "s" }))
  end)

  it("raises when cache_size or queue_size is above the maximum", function()
    contains("at most", raises(chatstream.open, { cache_size = (1 << 20) + 1 }))
    contains("at most", raises(chatstream.open, { queue_size = (1 << 20) + 1 }))
  end)

  it("memory() returns a MemoryDB", function()
    local db = chatstream.memory()
    assert.are.equal("userdata", type(db))
    assert.are.equal("chatstream.MemoryDB", getmetatable(db).__name)
    assert.truthy(tostring(db):find("^chatstream.MemoryDB "))
    db:close()
  end)
end)

-- Runs body(kind, ctx) once per backend, where ctx.inst is a database made once
-- for the describe (ids are shared by its tests: they never assume values,
-- except the tests that make their own fresh one).
local function per_backend(body)
  H.each_backend(_ENV, function(kind)
    local ctx = {}
    lazy_setup(function()
      ctx.inst = H.new_instance(kind)
    end)
    lazy_teardown(function()
      ctx.inst:close()
    end)
    body(kind, ctx)
  end)
end

describe("Store", function()
  per_backend(function(kind, ctx)
    local store
    before_each(function()
      store = ctx.inst:open()
    end)
    after_each(function()
      store:close()
    end)

    it("is a chatstream.Store of its kind", function()
      assert.are.equal("chatstream.Store", getmetatable(store).__name)
      assert.are.equal(kind, store:kind())
    end)

    it("opens with an options table", function()
      local s = ctx.inst:open({
        cache_size = 8, queue_size = 4, poll_interval = 0.5,
        authorize = function() return true end,
      })
      assert.are.equal("chatstream.Store", getmetatable(s).__name)
      local chat = s:create_chat()
      assert.are.equal("integer", math.type(chat))
      s:close()
    end)

    it("two stores on one database see each other's chats and messages", function()
      local a, b = ctx.inst:open(), ctx.inst:open()
      local chat = a:create_chat({ owner = "alice" })
      -- b appends to a's chat: the chat is shared.
      local ids = b:append(chat, msg("user", "from b"))
      local sub = a:subscribe(chat)
      -- the snapshot begins with the chat's status, then its messages.
      assert.are.same(status_event(chat), sub:next(0))
      local ev = sub:next(0)
      assert.are.equal(ids[1], ev.id)
      assert.are.equal("from b", ev.content)
      -- a live message written on a reaches a reader on b.
      local bsub = b:subscribe(chat, { after = ids[1] })
      assert.are.same(status_event(chat), bsub:next(0))
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { bsub:next(0) })
      local more = a:append(chat, msg("assistant", "from a"))
      ev = bsub:next(LIVE)
      assert.are.equal(more[1], ev.id)
      assert.are.equal("from a", ev.content)
      assert.are.equal(ids[1], ev.prev_id)
      -- chat ids come from the shared database too.
      assert.are.equal(chat + 1, b:create_chat())
      sub:close(); bsub:close(); a:close(); b:close()
    end)

    it("stores without a shared database do not see each other's chats", function()
      H.with_instance(kind, function(other)
        local a, b = ctx.inst:open(), other:open()
        local chat = a:create_chat()
        a:append(chat, msg("user", "a only"))
        local sub, err, code = b:subscribe(chat, { after = 0 })
        -- b has a database of its own with no chats at all.
        assert.is_nil(sub)
        assert.truthy(err:find("^ENOTFOUND: "))
        assert.are.equal("ENOTFOUND", code)
        a:close()
      end)
    end)

    it("ids start at 1 on a new database", function()
      H.with_instance(kind, function(fresh)
        local s = fresh:open()
        assert.are.equal(1, s:create_chat())
        assert.are.equal(2, s:create_chat())
        assert.are.same({ 1, 2 }, s:append(2, { msg("user", "a"), msg("user", "b") }))
        assert.are.same({ 3 }, s:append(1, msg("user", "c")))
      end)
    end)

    it("create_chat returns increasing integer ids", function()
      local c1 = store:create_chat({ owner = "alice", title = "one" })
      local c2 = store:create_chat()
      local c3 = store:create_chat({})
      assert.are.equal("integer", math.type(c1))
      assert.are.equal("integer", math.type(c2))
      assert.are.equal(c1 + 1, c2)
      assert.are.equal(c2 + 1, c3)
    end)

    it("create_chat raises on bad option types", function()
      contains("owner", raises(store.create_chat, store, { owner = 5 }))
      contains("title", raises(store.create_chat, store, { title = {} }))
      contains("unknown option 'color'", raises(store.create_chat, store, { color = "red" }))
      contains("table expected", raises(store.create_chat, store, "alice"))
    end)

    it("append takes one message table and returns a list of one integer id", function()
      local chat = store:create_chat()
      local ids = store:append(chat, msg("user", "hi"))
      assert.are.equal("table", type(ids))
      assert.are.equal(1, #ids)
      assert.are.equal("integer", math.type(ids[1]))
    end)

    it("append takes a list and returns ascending consecutive ids", function()
      local chat = store:create_chat()
      local ids = store:append(chat, {
        msg("system", "s"), msg("user", "u"), msg("assistant", "a"), msg("tool", "t"),
      })
      assert.are.equal(4, #ids)
      for i = 2, 4 do
        assert.are.equal("integer", math.type(ids[i]))
        assert.are.equal(ids[i - 1] + 1, ids[i])
      end
    end)

    it("append ids come from one sequence shared by all chats", function()
      local a, b = store:create_chat(), store:create_chat()
      local a1 = store:append(a, msg("user", "a1"))[1]
      local b1 = store:append(b, msg("user", "b1"))[1]
      local a2 = store:append(a, msg("user", "a2"))[1]
      local b23 = store:append(b, { msg("user", "b2"), msg("user", "b3") })
      local a3 = store:append(a, msg("user", "a3"))[1]
      assert.are.same({ a1 + 1, a1 + 2, a1 + 3, a1 + 4, a1 + 5 },
        { b1, a2, b23[1], b23[2], a3 })
      -- chat a's ids rise with holes; prev_id links them.
      local evs = after_status(read_all(store:subscribe(a)), a)
      assert.are.same({ a1, a2, a3 }, ids_of(evs))
      assert.are.same({ 0, a1, a2 }, { evs[1].prev_id, evs[2].prev_id, evs[3].prev_id })
    end)

    it("append raises on a bad role", function()
      local chat = store:create_chat()
      local err = raises(store.append, store, chat, msg("admin", "x"))
      contains("message role must be system, user, assistant or tool", err)
      contains("role", raises(store.append, store, chat, { content = "x", role = 1 }))
      contains("role", raises(store.append, store, chat, { msg("user", "ok"), msg("root", "x") }))
    end)

    it("append raises on content that is not a string", function()
      local chat = store:create_chat()
      contains("message content must be a string", raises(store.append, store, chat, msg("user", 5)))
      contains("message content must be a string", raises(store.append, store, chat, { role = "user" }))
      contains("message content must be a string",
        raises(store.append, store, chat, { msg("user", "ok"), msg("user", {}) }))
    end)

    it("append and prepare raise on content with a NUL byte, and nothing is written", function()
      local chat = store:create_chat()
      contains("must not contain a NUL byte", raises(store.append, store, chat, msg("user", "a\0b")))
      contains("must not contain a NUL byte",
        raises(store.prepare, store, chat, { msg("user", "ok"), msg("user", "\0") }))
      local sub = assert(store:subscribe(chat))
      assert.are.same(status_event(chat), sub:next(0)) -- and no message after it
      assert.is_nil(sub:next(0))
      sub:close()
    end)

    it("append raises on an empty list", function()
      local chat = store:create_chat()
      contains("expected a message or a list of 1 to 4096 messages", raises(store.append, store, chat, {}))
    end)

    it("append raises on a message that is not a table", function()
      local chat = store:create_chat()
      contains("table expected", raises(store.append, store, chat, "hi"))
      contains("message must be a table", raises(store.append, store, chat, { "hi" }))
      contains("chat id must be a positive integer", raises(store.append, store, 0, msg("user", "x")))
    end)

    it("a raising append writes nothing", function()
      local chat = store:create_chat()
      raises(store.append, store, chat, { msg("user", "ok"), msg("nobody", "x") })
      local before = store:stats().writes
      -- the snapshot is the chat's status alone: no message
      assert.are.same({ status_event(chat) }, read_all(store:subscribe(chat)))
      assert.are.equal(before, store:stats().writes)
    end)

    it("append to a missing chat returns nil, ENOTFOUND", function()
      local n = select("#", store:append(999, msg("user", "x")))
      local ids, err, code = store:append(999, msg("user", "x"))
      assert.are.equal(3, n)
      assert.is_nil(ids)
      assert.are.equal("ENOTFOUND: no chat 999", err)
      assert.are.equal("ENOTFOUND", code)
    end)

    it("stats() returns every counter as an integer, all 0 on a new store", function()
      local st = store:stats()
      for _, k in ipairs(STAT_KEYS) do
        assert.are.equal("integer", math.type(st[k]), k)
        assert.are.equal(0, st[k], k)
      end
      assert.are.equal("", st.last_warning)
      assert.is_nil(st.notify_queue_usage) -- the memory store has no queue
      local n = 0
      for _ in pairs(st) do
        n = n + 1
      end
      assert.are.equal(#STAT_KEYS + 1, n)
    end)

    it("watermark subscriptions of one chat share one DB pass per notification", function()
      local writer = ctx.inst:open() -- another hub: its cache is not this one's
      local chat = store:create_chat()
      local subs = {}
      for i = 1, 10 do
        subs[i] = { sub = assert(store:subscribe(chat, { ordered = i % 2 == 0 })), got = {} }
        H.drain(subs[i].sub)
      end
      local rescan = assert(store:subscribe(chat, { strategy = "rescan" }))
      H.drain(rescan)
      local before = store:stats()
      local ids = {}
      for i = 1, 5 do
        -- Published step by step: a plain hint (a plain append's notification
        -- on PostgreSQL carries the message, and no reader would query).
        local p = writer:prepare(chat, { role = "user", content = "m" .. i })
        ids[i] = assert(p:commit())[1]
        assert(p:publish())
        p:close()
        H.settle(store, before.notifications + i)
        for _, r in ipairs(subs) do
          H.drain(r.sub, r.got)
        end
        assert.are.same({ ids[i] }, H.drain(rescan))
      end
      for _, r in ipairs(subs) do
        assert.are.same(ids, r.got)
      end
      local st = store:stats()
      -- per notification: one query for the ten watermark readers, one for
      -- the rescan reader (the reference's rule: its own DB pass, always)
      assert.are.equal(5 + 5, st.queries - before.queries)
      assert.are.equal(5 * 9, st.shared_passes - before.shared_passes)
      assert.are.equal(10, st.db_passes - before.db_passes)
      for _, r in ipairs(subs) do
        r.sub:close()
      end
      rescan:close()
    end)

    it("stats() counts one write per append transaction", function()
      local chat = store:create_chat()
      local w = store:stats().writes
      store:append(chat, msg("user", "one"))
      assert.are.equal(w + 1, store:stats().writes)
      store:append(chat, { msg("user", "two"), msg("user", "three") })
      assert.are.equal(w + 2, store:stats().writes)
      store:append(999, msg("user", "lost"))
      assert.are.equal(w + 2, store:stats().writes)
    end)

    it("stats() counts delivered events when they are read, not before", function()
      local chat = store:create_chat()
      store:append(chat, { msg("user", "a"), msg("user", "b") })
      local q = store:stats().queries
      local sub = store:subscribe(chat)
      -- the snapshot: one statement (the chat's status, its queue, its messages)
      assert.are.equal(q + 1, store:stats().queries)
      assert.are.equal(0, store:stats().delivered)
      -- delivered counts message events: the snapshot's status is not one
      assert.are.same(status_event(chat), sub:next(0))
      assert.are.equal(0, store:stats().delivered)
      sub:next(0)
      assert.are.equal(1, store:stats().delivered)
      sub:next(0)
      assert.are.equal(2, store:stats().delivered)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      assert.are.equal(2, store:stats().delivered)
      sub:close()
    end)

    it("stats() counts notifications received and cache hits for live messages", function()
      local chat = store:create_chat()
      local sub = store:subscribe(chat)
      assert.are.same(status_event(chat), sub:next(0))
      local st0 = store:stats()
      store:append(chat, msg("user", "live"))
      assert.are.equal("live", sub:next(LIVE).content)
      local st1 = store:stats()
      assert.are.equal(st0.notifications + 1, st1.notifications)
      assert.are.equal(st0.cache_hits + 1, st1.cache_hits) -- the writer's own cache
      assert.are.equal(st0.db_passes, st1.db_passes) -- so no DB pass
      assert.are.equal(0, st1.malformed)
      assert.are.equal(0, st1.publish_errors)
      sub:close()
    end)

    it("stats() counts a resync when a subscription's queue overflows, losing nothing", function()
      local s = ctx.inst:open({ queue_size = 1 })
      local chat = s:create_chat()
      local sub = s:subscribe(chat)
      local want = {}
      for i = 1, 3 do
        want[i] = s:append(chat, msg("user", "m" .. i))[1]
      end
      assert.are.equal(0, s:stats().resyncs)
      assert.are.equal(3, step_for(s, 3)) -- routes 3 hints into a queue of 1
      assert.are.equal(1, s:stats().resyncs)
      assert.are.same(want, ids_of(after_status(read_all(sub), chat)))
      s:close()
    end)

    it("fd() is pollfd(): one integer, the same for the store's life", function()
      assert.are.equal(1, select("#", store:fd()))
      assert.are.equal("integer", math.type(store:fd()))
      assert.is_true(store:fd() >= 0)
      assert.are.equal(store:pollfd(), store:fd())
      assert.are.equal("r", store:events())
      assert.are_not.equal(store:fd(), store:notify_fd())
    end)

    if kind == "memory" then

      it("listener_pid() is nil on the memory store", function()
        assert.are.equal(1, select("#", store:listener_pid()))
        assert.is_nil(store:listener_pid())
      end)
    else
      it("listener_pid() is the listener's server PID, an integer", function()
        assert.are.equal(1, select("#", store:listener_pid()))
        assert.are.equal("integer", math.type(store:listener_pid()))
        assert.is_true(store:listener_pid() > 0)
        -- each store has a listener of its own
        local other = ctx.inst:open()
        assert.are_not.equal(store:listener_pid(), other:listener_pid())
        other:close()
      end)
    end

    it("step() returns the number of notifications received", function()
      assert.are.equal(0, store:step())
      local chat = store:create_chat()
      local sub = store:subscribe(chat)
      store:append(chat, { msg("user", "a") })
      store:append(chat, { msg("user", "b") })
      local n = step_for(store, 2)
      assert.are.equal("integer", math.type(n))
      assert.are.equal(2, n)
      assert.are.equal(0, store:step())
      -- the routed notifications are not lost: the reader gets both.
      assert.are.equal(2, #after_status(read_all(sub), chat))
      sub:close()
    end)

    it("migrate() returns true", function()
      assert.are.equal(true, store:migrate())
      assert.are.equal(true, store:migrate()) -- idempotent
    end)
  end)
end)

describe("Store (memory only)", function()
  it("stats() counts query errors", function()
    local db = chatstream.memory()
    local s = chatstream.open({ memory = db })
    local chat = s:create_chat()
    db:fail_queries(1)
    assert.is_nil(s:subscribe(chat))
    assert.are.equal(1, s:stats().query_errors)
    -- the snapshot's one statement failed
    assert.are.equal(1, s:stats().queries)
    s:close(); db:close()
  end)
end)

describe("Publish", function()
  per_backend(function(_, ctx)
    local store, chat
    before_each(function()
      store = ctx.inst:open()
      chat = store:create_chat({ owner = "alice" })
    end)
    after_each(function()
      store:close()
    end)

    it("store:prepare returns a Publish", function()
      local p = store:prepare(chat, { msg("tool", "x"), msg("user", "y") })
      assert.are.equal("chatstream.Publish", getmetatable(p).__name)
      p:close()
    end)

    it("commit returns the ids, ascending integers", function()
      local p = store:prepare(chat, { msg("tool", "x"), msg("user", "y") })
      local ids = p:commit()
      assert.are.equal(2, #ids)
      assert.are.equal("integer", math.type(ids[1]))
      assert.are.equal(ids[1] + 1, ids[2])
      p:close()
    end)

    it("prepare raises on bad messages like append", function()
      contains("role", raises(store.prepare, store, chat, msg("bad", "x")))
      contains("expected a message or a list", raises(store.prepare, store, chat, {}))
    end)

    it("commit to a missing chat returns nil, ENOTFOUND", function()
      local p = store:prepare(999, msg("user", "x"))
      local ids, err, code = p:commit()
      assert.is_nil(ids)
      assert.are.equal("ENOTFOUND: no chat 999", err)
      assert.are.equal("ENOTFOUND", code)
      p:close()
    end)

    it("a reader subscribed before sees nothing until notify, then the message", function()
      local sub = store:subscribe(chat)
      assert.are.same(status_event(chat), sub:next(0))
      local p = store:prepare(chat, msg("user", "hello"))
      local ids = p:commit()
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      assert.are.equal(true, p:cache(1))
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      -- Nothing was sent either: a marker sent now, in another chat, is the
      -- first notification to arrive (PostgreSQL delivers them in the order
      -- sent, so one sent by commit or cache would have come before it).
      local marker = store:create_chat()
      local msub = store:subscribe(marker)
      assert.are.same(status_event(marker), msub:next(0))
      local mark = store:append(marker, msg("user", "marker"))[1]
      assert.are.equal(mark, msub:next(LIVE).id)
      assert.are.equal(1, store:stats().notifications)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      assert.are.equal(true, p:notify(1))
      local ev = sub:next(LIVE)
      assert.are.equal("message", ev.kind)
      assert.are.equal(ids[1], ev.id)
      assert.are.equal("hello", ev.content)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      p:close(); sub:close(); msub:close()
    end)

    it("cache(i) and notify(i) take a 1-based index", function()
      local sub = store:subscribe(chat, { strategy = "last_id" })
      local p = store:prepare(chat, { msg("tool", "x"), msg("user", "y") })
      local ids = p:commit()
      -- only message 2 cached and notified: last_id takes it from the cache.
      assert.are.equal(true, p:cache(2))
      assert.are.equal(true, p:notify(2))
      settle(store, 1)
      assert.are.same({ ids[2] }, ids_of(after_status(read_all(sub), chat)))
      -- message 1 was not cached, so it can still be cached by index.
      assert.are.equal(true, p:cache(1))
      contains("message 2 already cached", raises(p.cache, p, 2))
      p:close(); sub:close()
    end)

    it("publish() caches and notifies all the remaining messages", function()
      local sub = store:subscribe(chat)
      local p = store:prepare(chat, { msg("tool", "x"), msg("user", "y"), msg("user", "z") })
      local ids = p:commit()
      assert.are.equal(true, p:cache(1))
      assert.are.equal(true, p:notify(1))
      settle(store, 1)
      assert.are.same({ ids[1] }, ids_of(after_status(read_all(sub), chat)))
      assert.are.equal(true, p:publish())
      settle(store, 3)
      assert.are.same({ ids[2], ids[3] }, ids_of(read_all(sub)))
      contains("already cached", raises(p.cache, p, 3))
      contains("already notified", raises(p.notify, p, 2))
      p:close(); sub:close()
    end)

    it("cache() and notify() without an index do all the remaining", function()
      local sub = store:subscribe(chat)
      local p = store:prepare(chat, { msg("tool", "x"), msg("user", "y") })
      local ids = p:commit()
      assert.are.equal(true, p:cache())
      assert.are.equal(true, p:notify())
      settle(store, 2)
      assert.are.same(ids, ids_of(after_status(read_all(sub), chat)))
      contains("already notified", raises(p.notify, p, 1))
      p:close(); sub:close()
    end)

    it("raises on cache or notify before commit", function()
      local p = store:prepare(chat, msg("user", "x"))
      contains("commit before publishing", raises(p.cache, p, 1))
      contains("commit before publishing", raises(p.notify, p, 1))
      contains("commit before publishing", raises(p.publish, p))
      p:close()
    end)

    it("raises on a second commit", function()
      local p = store:prepare(chat, msg("user", "x"))
      p:commit()
      contains("already committed", raises(p.commit, p))
      p:close()
    end)

    it("raises on cache(i) twice", function()
      local p = store:prepare(chat, { msg("user", "x"), msg("user", "y") })
      p:commit()
      p:cache(1)
      contains("message 1 already cached", raises(p.cache, p, 1))
      p:close()
    end)

    it("raises on notify(i) twice", function()
      local p = store:prepare(chat, { msg("user", "x"), msg("user", "y") })
      p:commit()
      p:notify(2)
      contains("message 2 already notified", raises(p.notify, p, 2))
      p:close()
    end)

    it("raises on index 0 or out of range", function()
      local p = store:prepare(chat, { msg("user", "x"), msg("user", "y") })
      p:commit()
      contains("message index starts at 1", raises(p.cache, p, 0))
      contains("message index starts at 1", raises(p.notify, p, -1))
      contains("message index out of range", raises(p.cache, p, 3))
      contains("message index out of range", raises(p.notify, p, 3))
      p:close()
    end)

    it("raises on a non-integer index", function()
      local p = store:prepare(chat, { msg("user", "x"), msg("user", "y") })
      p:commit()
      contains("number has no integer representation", raises(p.cache, p, 1.5))
      contains("number expected", raises(p.notify, p, "first"))
      p:close()
    end)
  end)
end)

describe("Subscription", function()
  per_backend(function(_, ctx)
    local store, chat, ids
    before_each(function()
      store = ctx.inst:open()
      chat = store:create_chat({ owner = "alice" })
      local other = store:create_chat()
      ids = {}
      -- interleave with another chat so this chat's ids have holes
      for i = 1, 3 do
        ids[i] = store:append(chat, msg(i == 2 and "assistant" or "user", "m" .. i))[1]
        store:append(other, msg("user", "other " .. i))
      end
    end)
    after_each(function()
      store:close()
    end)

    it("shares a message's event table between subscriptions with share_events, and only then", function()
      local shared = ctx.inst:open({ share_events = true })
      local function firsts(st)
        local a, b = st:subscribe(chat), st:subscribe(chat)
        local ea, eb = after_status(read_all(a), chat), after_status(read_all(b), chat)
        a:close()
        b:close()
        return ea, eb
      end
      local sa, sb = firsts(shared)
      assert.are.equal(3, #sa)
      for i = 1, 3 do
        assert.are.equal(ids[i], sa[i].id)
        assert.is_true(rawequal(sa[i], sb[i]), "one table for message " .. i)
        assert.are.equal(sa[i].id, sa[i].cursor)
      end
      -- a later message, live, to both: one table as well
      local a, b = shared:subscribe(chat), shared:subscribe(chat)
      read_all(a)
      read_all(b)
      local id = store:append(chat, msg("user", "live"))[1]
      local la = H.next_message(a, 2)
      local lb = H.next_message(b, 2)
      assert.are.same({ id, "live" }, { la.id, la.content })
      assert.is_true(rawequal(la, lb))
      a:close()
      b:close()
      local pa, pb = firsts(store) -- a store without the option: a table each
      assert.are.same(pa, pb)
      for i = 1, 3 do
        assert.is_false(rawequal(pa[i], pb[i]))
      end
      shared:close()
      contains("option 'share_events' must be a boolean", raises(ctx.inst.open, ctx.inst, { share_events = 1 }))
    end)

    it("delivers the snapshot first, ascending, with every message field", function()
      local sub = store:subscribe(chat)
      assert.are.equal("chatstream.Subscription", getmetatable(sub).__name)
      local all = read_all(sub)
      assert.are.equal(4, #all) -- the chat's status, then its 3 messages
      assert.are.same(status_event(chat), all[1])
      assert.are.equal("integer", math.type(all[1].chat_id))
      assert.are.equal("integer", math.type(all[1].version))
      local evs = after_status(all, chat)
      for i, ev in ipairs(evs) do
        assert.are.equal("message", ev.kind)
        assert.are.equal(ids[i], ev.id)
        assert.are.equal("integer", math.type(ev.id))
        assert.are.equal(chat, ev.chat_id)
        assert.are.equal("integer", math.type(ev.chat_id))
        assert.are.equal(i == 2 and "assistant" or "user", ev.role)
        assert.are.equal("m" .. i, ev.content)
        assert.are.equal(i == 1 and 0 or ids[i - 1], ev.prev_id)
        assert.are.equal("integer", math.type(ev.prev_id))
      end
    end)

    it("delivers only messages with id > after in the snapshot", function()
      local sub = store:subscribe(chat, { after = ids[1] })
      assert.are.same({ ids[2], ids[3] }, ids_of(after_status(read_all(sub), chat)))
      local all = store:subscribe(chat, { after = ids[3] })
      assert.are.same({ status_event(chat) }, read_all(all)) -- no message

    end)

    it("delivers live events after the snapshot", function()
      local sub = store:subscribe(chat)
      assert.are.same(status_event(chat), sub:next(0))
      local first = sub:next(0)
      assert.are.equal(ids[1], first.id)
      local new = store:append(chat, msg("user", "m4"))[1]
      settle(store, 1)
      assert.are.same({ ids[2], ids[3], new }, ids_of(read_all(sub)))
    end)

    it("live events carry the chat's previous id as prev_id", function()
      local sub = store:subscribe(chat, { after = ids[3] })
      local new = store:append(chat, { msg("user", "m4"), msg("tool", "m5") })
      settle(store, 2)
      local evs = after_status(read_all(sub), chat)
      assert.are.same(new, ids_of(evs))
      assert.are.equal(ids[3], evs[1].prev_id)
      assert.are.equal(new[1], evs[2].prev_id)
      assert.are.equal("tool", evs[2].role)
      assert.are.equal("m5", evs[2].content)
    end)

    it("next(timeout) returns an event, or nil, 'timeout' when idle", function()
      local sub = store:subscribe(chat, { after = ids[2] })
      assert.are.same(status_event(chat), sub:next(0.05))
      local ev = sub:next(0.05)
      assert.are.equal(ids[3], ev.id)
      local n = select("#", sub:next(0.05))
      local a, b = sub:next(0)
      assert.are.equal(3, n)
      assert.is_nil(a)
      assert.are.equal("timeout", b)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next() }) -- the timeout is optional
    end)

    it("next raises on a negative timeout", function()
      local sub = store:subscribe(chat)
      contains("timeout must be a number >= 0", raises(sub.next, sub, -1))
      contains("timeout must be a number >= 0", raises(sub.events, sub, -1))
    end)

    it("events(timeout) ends when idle", function()
      local sub = store:subscribe(chat)
      local n = 0
      for ev in sub:events(0.05) do
        n = n + 1
        if n == 1 then
          assert.are.same(status_event(chat), ev) -- the snapshot's first event
        else
          assert.are.equal(ids[n - 1], ev.id)
        end
      end
      assert.are.equal(4, n) -- the status and the 3 messages
      -- a new loop on an idle subscription runs zero times
      for _ in sub:events(0) do
        n = n + 1
      end
      assert.are.equal(4, n)
    end)

    it("events() returns iter, sub, nil like io.lines", function()
      local sub = store:subscribe(chat)
      local n = select("#", sub:events(0))
      local f, s, init = sub:events(0)
      assert.are.equal(3, n)
      assert.are.equal("function", type(f))
      assert.are.equal(sub, s)
      assert.is_nil(init)
      assert.are.same(status_event(chat), f(s, init))
      assert.are.equal(ids[1], f(s, init).id)
    end)

    it("cursor() is the highest id after everything is read", function()
      local sub = store:subscribe(chat)
      assert.are.equal("integer", math.type(sub:cursor()))
      read_all(sub)
      assert.are.equal(ids[3], sub:cursor())
      local new = store:append(chat, msg("user", "m4"))[1]
      settle(store, 1)
      read_all(sub)
      assert.are.equal(new, sub:cursor())
    end)

    it("cursor() is the after value on an empty snapshot", function()
      local sub = store:subscribe(chat, { after = ids[3] })
      assert.are.equal(ids[3], sub:cursor())
    end)

    it("resubscribing with after = cursor() gives nothing old", function()
      local sub = store:subscribe(chat)
      read_all(sub)
      local again = store:subscribe(chat, { after = sub:cursor() })
      assert.are.same(status_event(chat), again:next(0))
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { again:next(0) })
      local new = store:append(chat, msg("user", "m4"))[1]
      settle(store, 1)
      assert.are.same({ new }, ids_of(read_all(again)))
    end)

    for _, strategy in ipairs({ "watermark", "rescan", "last_id" }) do
      it("accepts strategy '" .. strategy .. "' and gives snapshot then live", function()
        local sub = store:subscribe(chat, { strategy = strategy, after = ids[1] })
        assert.are.same({ ids[2], ids[3] }, ids_of(after_status(read_all(sub), chat)))
        local new = store:append(chat, msg("user", "m4"))[1]
        settle(store, 1)
        assert.are.same({ new }, ids_of(read_all(sub)))
        assert.are.equal(new, sub:cursor())
      end)
    end

    it("raises on an unknown strategy", function()
      contains("unknown strategy 'fast'", raises(store.subscribe, store, chat, { strategy = "fast" }))
      contains("strategy", raises(store.subscribe, store, chat, { strategy = 1 }))
    end)

    it("accepts ordered = true with the watermark strategy", function()
      local sub = store:subscribe(chat, { ordered = true })
      assert.are.same(ids, ids_of(after_status(read_all(sub), chat)))
      local w = store:subscribe(chat, { ordered = true, strategy = "watermark" })
      assert.are.same(ids, ids_of(after_status(read_all(w), chat)))
    end)

    it("raises on ordered = true with a non-watermark strategy", function()
      for _, s in ipairs({ "rescan", "last_id" }) do
        contains("option 'ordered' needs the watermark strategy",
          raises(store.subscribe, store, chat, { ordered = true, strategy = s }))
      end
    end)

    it("raises on unknown subscribe options", function()
      contains("unknown option 'from'", raises(store.subscribe, store, chat, { from = 1 }))
    end)

    it("returns nil, ENOTFOUND for a missing chat", function()
      local n = select("#", store:subscribe(999))
      local sub, err, code = store:subscribe(999)
      assert.are.equal(3, n)
      assert.is_nil(sub)
      assert.are.equal("ENOTFOUND: no chat 999", err)
      assert.are.equal("ENOTFOUND", code)
    end)

    it("raises on after < 0", function()
      contains("option 'after' must be an integer >= 0", raises(store.subscribe, store, chat, { after = -1 }))
      contains("after", raises(store.subscribe, store, chat, { after = 1.5 }))
    end)

    it("raises on chat id 0 or a string", function()
      contains("chat id must be a positive integer", raises(store.subscribe, store, 0))
      contains("chat id must be a positive integer", raises(store.subscribe, store, -3))
      contains("number expected", raises(store.subscribe, store, "chat"))
    end)
  end)

  describe("with memory fault knobs (memory only)", function()
    local db, writer, reader, c
    before_each(function()
      db = chatstream.memory()
      writer = chatstream.open({ memory = db })
      reader = chatstream.open({ memory = db })
      c = writer:create_chat()
    end)
    after_each(function()
      reader:close(); writer:close(); db:close()
    end)

    it("fail_queries(1) before subscribe gives nil, EBACKEND, then the next subscribe works", function()
      local id = writer:append(c, msg("user", "x"))[1]
      assert.are.equal(db, db:fail_queries(1)) -- returns the db
      local r = table.pack(reader:subscribe(c))
      assert.are.equal(3, r.n)
      local sub, err, code = r[1], r[2], r[3]
      assert.is_nil(sub)
      assert.truthy(err:find("^EBACKEND: ."), err)
      assert.are.equal("EBACKEND", code)
      sub = reader:subscribe(c)
      assert.are.same({ id }, ids_of(after_status(read_all(sub), c)))
    end)

    it("fail_queries(0) clears the knob", function()
      db:fail_queries(3)
      db:fail_queries(0)
      local sub = reader:subscribe(c)
      assert.are.equal("chatstream.Subscription", getmetatable(sub).__name)
    end)

    it("a failed live DB pass is retried on the next call, not lost", function()
      local sub = reader:subscribe(c)
      assert.are.same(status_event(c), sub:next(0))
      local id = writer:append(c, msg("user", "x"))[1]
      db:fail_queries(1)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      assert.are.equal(1, reader:stats().query_errors)
      assert.are.equal(id, sub:next(0).id)
    end)

    it("drop_notifies(1) drops exactly one notification; the reader catches up on the next", function()
      local sub = reader:subscribe(c) -- default strategy: watermark
      assert.are.same(status_event(c), sub:next(0))
      assert.are.equal(db, db:drop_notifies(1))
      local m1 = writer:append(c, msg("user", "m1"))[1]
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      assert.are.equal(0, reader:stats().notifications)
      local m2 = writer:append(c, msg("user", "m2"))[1]
      assert.are.same({ m1, m2 }, ids_of(read_all(sub)))
      assert.are.equal(1, reader:stats().notifications)
      local m3 = writer:append(c, msg("user", "m3"))[1]
      assert.are.same({ m3 }, ids_of(read_all(sub)))
      assert.are.equal(2, reader:stats().notifications)
      assert.are.equal(m3, sub:cursor())
    end)

    it("negative counts raise", function()
      contains("count must be >= 0", raises(db.fail_queries, db, -1))
      contains("count must be >= 0", raises(db.drop_notifies, db, -1))
      contains("number expected", raises(db.drop_notifies, db, "one"))
    end)
  end)
end)
