-- spec/conventions_spec.lua - handle conventions (DESIGN.md section 7, STYLE.md
-- "Lua binding"): close, <close>, __gc, __tostring, use after close, iterators.
-- The Store, Publish and Subscription handles are checked on every store of the
-- matrix (spec/helpers.lua); the MemoryDB handle is the memory store's own.
local chatstream = require("chatstream")
local H = require("helpers")

local raises, contains = H.raises, H.contains

local function msg(content)
  return { role = "user", content = content }
end

-- How long a read waits for an event that must come: the memory store answers
-- at once (nothing can arrive while it waits), PostgreSQL when it is there.
local LIVE = 5

-- The stores a test opened with ctx.open; closed after it (after_each).
local opened = {}

local function close_opened()
  for i = #opened, 1, -1 do
    opened[i]:close()
    opened[i] = nil
  end
end

-- A store on the database of inst, as inst:open makes it. inst:open holds on
-- to its stores until inst:close; these are held by `opened` (ctx.open, closed
-- after the test) or by nothing at all (ctx.free), for the garbage collection
-- tests, where only the test may keep a store reachable.
local function open_on(inst, track)
  local o = { poll_interval = 0 }
  if inst.kind == "memory" then
    o.memory = inst.memdb
  else
    o.dsn, o.schema = H.dsn, inst.schema
  end
  local s = assert(chatstream.open(o))
  if track then
    opened[#opened + 1] = s
  end
  return s
end

-- What the handle factories get: open() a store closed after the test, free()
-- a store nothing holds on to.
local function context(inst)
  return {
    open = function()
      return open_on(inst, true)
    end,
    free = function()
      return open_on(inst, false)
    end,
  }
end

-- Runs body(kind, get) once per backend, where get() is the context of a
-- database made once for the describe; stores opened by ctx.open are closed
-- after each test.
local function per_backend(body)
  H.each_backend(_ENV, function(kind)
    local inst
    lazy_setup(function()
      inst = H.new_instance(kind)
    end)
    lazy_teardown(function()
      inst:close()
    end)
    after_each(close_opened)
    body(kind, function()
      return context(inst)
    end)
  end)
end

-- One entry per handle type: make(ctx) returns the handle and what keeps its
-- context (store, chat) reachable; uses are calls that must raise once closed.
-- fresh: works() gives the same answer only on a new, empty database.
local kinds = {
  {
    name = "MemoryDB",
    what = "memory database",
    memory_only = true,
    make = function()
      return chatstream.memory()
    end,
    works = function(db)
      local s = chatstream.open({ memory = db })
      local chat = s:create_chat()
      s:close()
      return chat
    end,
    uses = {
      fail_queries = function(db) return db:fail_queries(1) end,
      drop_notifies = function(db) return db:drop_notifies(1) end,
      ["open{memory = db}"] = function(db) return chatstream.open({ memory = db }) end,
    },
  },
  {
    name = "Store",
    what = "store",
    fresh = true,
    make = function(ctx)
      return ctx.free() -- only the test holds it: the garbage tests drop it
    end,
    works = function(s)
      return s:create_chat()
    end,
    uses = {
      create_chat = function(s) return s:create_chat() end,
      append = function(s) return s:append(1, msg("x")) end,
      prepare = function(s) return s:prepare(1, msg("x")) end,
      subscribe = function(s) return s:subscribe(1) end,
      stats = function(s) return s:stats() end,
      fd = function(s) return s:fd() end,
      step = function(s) return s:step() end,
      migrate = function(s) return s:migrate() end,
      kind = function(s) return s:kind() end,
      listener_pid = function(s) return s:listener_pid() end,
    },
  },
  {
    name = "Publish",
    what = "publish",
    make = function(ctx)
      local s = ctx.open()
      local chat = s:create_chat()
      return s:prepare(chat, { msg("a"), msg("b") }), s
    end,
    works = function(p)
      return #p:commit()
    end,
    uses = {
      commit = function(p) return p:commit() end,
      cache = function(p) return p:cache(1) end,
      notify = function(p) return p:notify(1) end,
      publish = function(p) return p:publish() end,
    },
  },
  {
    name = "Subscription",
    what = "subscription",
    make = function(ctx)
      local s = ctx.open()
      local chat = s:create_chat()
      s:append(chat, msg("a"))
      return s:subscribe(chat), s
    end,
    works = function(sub)
      -- the snapshot: the chat's status first, then its message
      local status = sub:next(0)
      local ev = sub:next(0)
      assert.are.same(H.status_event(ev.chat_id), status)
      return ev.content
    end,
    uses = {
      next = function(sub) return sub:next(0) end,
      events = function(sub) return sub:events(0) end,
      cursor = function(sub) return sub:cursor() end,
      delivered_bytes = function(sub) return sub:delivered_bytes() end,
    },
  },
}

local expected_work = { MemoryDB = 1, Store = 1, Publish = 2, Subscription = "a" }

-- The handle tests of kind k on one backend; get() gives the context.
local function handle_tests(k, kind, get)
  local mt_name = "chatstream." .. k.name
  local function make()
    return k.make(get and get())
  end

  -- Runs fn(make) with make on a new, empty database if k needs one.
  local function on_fresh(fn)
    if k.fresh then
      H.with_instance(kind, function(inst)
        fn(function()
          return k.make(context(inst))
        end)
      end)
    else
      fn(make)
    end
  end

  it("works when open and says so in tostring", function()
    on_fresh(function(mk)
      local h = mk()
      assert.are.equal(mt_name, getmetatable(h).__name)
      local s = tostring(h)
      assert.truthy(s:find("^" .. mt_name .. " "), s)
      assert.is_nil(s:find("(closed)", 1, true))
      assert.are.equal(expected_work[k.name], k.works(h))
      h:close()
    end)
  end)

  it("close() twice is fine", function()
    local h = make()
    assert.are.equal(0, select("#", h:close()))
    assert.are.equal(0, select("#", h:close()))
    assert.are.equal(mt_name .. " (closed)", tostring(h))
  end)

  it("tostring says (closed) after close", function()
    local h = make()
    h:close()
    assert.are.equal(mt_name .. " (closed)", tostring(h))
  end)

  it("a <close> variable closes it at the end of its block", function()
    local seen
    do
      local h <close> = make()
      seen = h
      assert.is_nil(tostring(h):find("(closed)", 1, true))
    end
    assert.are.equal(mt_name .. " (closed)", tostring(seen))
  end)

  it("a <close> variable closes it when an error leaves the block", function()
    local seen
    local ok, err = pcall(function()
      local h <close> = make()
      seen = h
      error("boom", 0)
    end)
    assert.is_false(ok)
    assert.are.equal("boom", err)
    assert.are.equal(mt_name .. " (closed)", tostring(seen))
  end)

  it("a <close> variable is fine when the handle was already closed", function()
    local seen
    do
      local h <close> = make()
      seen = h
      h:close()
    end
    assert.are.equal(mt_name .. " (closed)", tostring(seen))
  end)

  for use, f in pairs(k.uses) do
    it("raises 'attempt to use a closed " .. k.what .. "' on " .. use .. " after close", function()
      local h, keep = make()
      h:close()
      local err = raises(f, h)
      contains("attempt to use a closed " .. k.what, err)
      if keep then
        keep:close()
      end
    end)
  end

  it("calling __gc after close is safe", function()
    local h = make()
    h:close()
    local gc = getmetatable(h).__gc
    assert.are.equal("function", type(gc))
    assert.are.equal(0, select("#", gc(h)))
    gc(h)
    assert.are.equal(mt_name .. " (closed)", tostring(h))
    for _, f in pairs(k.uses) do
      contains("attempt to use a closed " .. k.what, raises(f, h))
    end
    h:close()
  end)

  it("__gc and __close are the close function", function()
    local h = make()
    local mt = getmetatable(h)
    assert.are.equal(mt.__gc, mt.__close)
    assert.are.equal(mt.__gc, h.close)
    mt.__close(h, nil)
    assert.are.equal(mt_name .. " (closed)", tostring(h))
  end)

  it("collectgarbage() with live and closed handles is safe", function()
    on_fresh(function(mk)
      local live = mk()
      local closed = mk()
      closed:close()
      for _ = 1, 5 do
        mk() -- garbage, never closed: __gc closes it
      end
      collectgarbage("collect")
      collectgarbage("collect")
      assert.are.equal(mt_name .. " (closed)", tostring(closed))
      assert.are.equal(expected_work[k.name], k.works(live))
      live:close()
    end)
  end)
end

for _, k in ipairs(kinds) do
  describe(k.name .. " handle", function()
    if k.memory_only then
      handle_tests(k, "memory", nil)
    else
      per_backend(function(kind, get)
        handle_tests(k, kind, get)
      end)
    end
  end)
end

describe("Store handle lifetime", function()
  per_backend(function(_, get)
    it("migrate raises 'attempt to use a closed store' after close", function()
      local s = get().open()
      s:close()
      contains("attempt to use a closed store", raises(s.migrate, s))
    end)
  end)

  it("a closed MemoryDB handle does not close the stores opened on it", function()
    local db = chatstream.memory()
    local a = chatstream.open({ memory = db })
    local b = chatstream.open({ memory = db })
    db:close()
    local chat = a:create_chat()
    local id = a:append(chat, msg("shared"))[1]
    local sub = b:subscribe(chat)
    assert.are.same(H.status_event(chat), sub:next(0))
    assert.are.equal(id, sub:next(0).id)
    sub:close(); a:close(); b:close()
  end)
end)

describe("Subscription conventions", function()
  per_backend(function(_, get)
    local store, chat, ids
    before_each(function()
      store = get().open()
      chat = store:create_chat()
      ids = store:append(chat, { msg("one"), msg("two"), msg("three") })
    end)
    after_each(function()
      store:close()
    end)

    it("break out of a for loop leaves the subscription usable", function()
      local sub = store:subscribe(chat)
      assert.are.same(H.status_event(chat), sub:next(0)) -- the snapshot's first event
      local first
      for ev in sub:events() do -- luacheck: ignore 512 (the break is the point)
        first = ev.id
        break
      end
      assert.are.equal(ids[1], first)
      assert.is_nil(tostring(sub):find("(closed)", 1, true))
      assert.are.equal(ids[2], sub:next(0).id)
      local rest = {}
      for ev in sub:events(0) do
        rest[#rest + 1] = ev.id
      end
      assert.are.same({ ids[3] }, rest)
      sub:close()
    end)

    it("an error raised inside the for body propagates and the subscription stays usable", function()
      local sub = store:subscribe(chat)
      assert.are.same(H.status_event(chat), sub:next(0)) -- the snapshot's first event
      local ok, err = pcall(function()
        for ev in sub:events(0) do
          error({ id = ev.id })
        end
      end)
      assert.is_false(ok)
      assert.are.equal(ids[1], err.id)
      assert.are.equal(ids[2], sub:next(0).id)
      local ok2, err2 = pcall(function()
        for _ in sub:events(0) do
          error("inside the loop")
        end
      end)
      assert.is_false(ok2)
      contains("inside the loop", err2)
      assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0) })
      sub:close()
      assert.are.equal("chatstream.Subscription (closed)", tostring(sub))
    end)

    it("an error inside a for body with a <close> subscription closes it", function()
      local seen
      local ok, err = pcall(function()
        local sub <close> = store:subscribe(chat)
        seen = sub
        for _ in sub:events(0) do
          error("stop", 0)
        end
      end)
      assert.is_false(ok)
      assert.are.equal("stop", err)
      assert.are.equal("chatstream.Subscription (closed)", tostring(seen))
    end)

    it("the iterator raises when the subscription is closed inside the loop", function()
      local sub = store:subscribe(chat)
      local n = 0
      local ok, err = pcall(function()
        for _ in sub:events(0) do
          n = n + 1
          sub:close()
        end
      end)
      assert.is_false(ok)
      assert.are.equal(1, n)
      contains("attempt to use a closed subscription", err)
    end)

    it("closing the store makes subscription methods raise; closing it afterwards is safe", function()
      local sub = store:subscribe(chat)
      assert.are.same(H.status_event(chat), sub:next(0))
      assert.are.equal(ids[1], sub:next(0).id)
      store:close()
      assert.are.equal("chatstream.Store (closed)", tostring(store))
      contains("closed store", raises(sub.next, sub, 0))
      contains("closed store", raises(function()
        for _ in sub:events(0) do
        end
      end))
      assert.are.equal(0, select("#", sub:close()))
      sub:close()
      assert.are.equal("chatstream.Subscription (closed)", tostring(sub))
      contains("attempt to use a closed subscription", raises(sub.next, sub, 0))
      getmetatable(sub).__gc(sub)
    end)

    it("closing the store makes publish methods raise; closing it afterwards is safe", function()
      local p = store:prepare(chat, { msg("a"), msg("b") })
      local q = store:prepare(chat, { msg("c") })
      assert.are.equal(1, #q:commit())
      store:close()
      contains("closed store", raises(p.commit, p))
      contains("closed store", raises(q.cache, q, 1))
      contains("closed store", raises(q.notify, q, 1))
      contains("closed store", raises(q.publish, q))
      p:close(); q:close(); q:close()
      assert.are.equal("chatstream.Publish (closed)", tostring(p))
      contains("attempt to use a closed publish", raises(p.commit, p))
      getmetatable(q).__gc(q)
    end)

    it("a store closed by <close> leaves its subscription closable", function()
      local sub
      do
        local s <close> = get().open()
        local c = s:create_chat()
        s:append(c, msg("x"))
        sub = s:subscribe(c)
        assert.are.same(H.status_event(c), sub:next(0))
        assert.are.equal("x", sub:next(0).content)
      end
      contains("closed store", raises(sub.next, sub, 0))
      sub:close()
      assert.are.equal("chatstream.Subscription (closed)", tostring(sub))
    end)

    it("a subscription keeps its store alive", function()
      local ctx = get()
      local writer = ctx.open()
      local c = writer:create_chat()
      local first = writer:append(c, msg("before"))[1]
      local weak = setmetatable({}, { __mode = "v" })
      local sub
      do
        local reader = ctx.free() -- only the subscription holds it
        weak[1] = reader
        sub = reader:subscribe(c)
      end
      collectgarbage("collect")
      collectgarbage("collect")
      assert.are.equal("userdata", type(weak[1]))
      assert.is_nil(tostring(weak[1]):find("(closed)", 1, true))
      assert.are.same(H.status_event(c), sub:next(0))
      assert.are.equal(first, sub:next(0).id)
      local live = writer:append(c, msg("after"))[1]
      local ev = sub:next(LIVE)
      assert.are.equal(live, ev.id)
      assert.are.equal("after", ev.content)
      sub:close()
      writer:close()
      weak[1]:close()
    end)

    it("a publish keeps its store alive", function()
      local p
      do
        local s = get().free() -- only the publish holds it
        p = s:prepare(s:create_chat(), msg("x"))
      end
      collectgarbage("collect")
      collectgarbage("collect")
      local ids2 = p:commit()
      assert.are.equal(1, #ids2)
      assert.are.equal(true, p:publish())
      p:close()
      p = nil -- luacheck: ignore 311 (drops the store: its __gc closes it)
      collectgarbage("collect")
    end)

    it("collecting a store together with its open subscriptions is safe", function()
      do
        local s = get().free() -- only its subscriptions and publish hold it
        local c = s:create_chat()
        s:append(c, msg("x"))
        for _ = 1, 3 do
          s:subscribe(c)
        end
        s:prepare(c, msg("y"))
      end
      collectgarbage("collect")
      collectgarbage("collect")
      -- the state is still sound: a new store works
      local s = get().open()
      local c = s:create_chat()
      assert.are.equal(1, #s:append(c, msg("z")))
      s:close()
    end)
  end)
end)
