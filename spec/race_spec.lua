-- spec/race_spec.lua - deterministic promote/resume races, run under every strategy.
-- Each scenario replays a publish interleaving step by step. rescan and
-- watermark must deliver every message exactly once; last_id (the algorithm
-- before the reference fix) must show the loss the reference describes, which
-- proves the scenario really hits the race.
local chatstream = require("chatstream")
local H = require("helpers")

-- Ids the reader should have, from the database (a fresh replica's snapshot).
local function truth(db, chat_id, after)
  local store = assert(chatstream.open({ memory = db }))
  local sub = assert(store:subscribe(chat_id, { after = after }))
  local ids = H.drain(sub)
  sub:close()
  store:close()
  return ids
end

local function open_at(db, n, opts)
  opts = opts or {}
  opts.memory = db
  local store = assert(chatstream.open(opts))
  if n > 0 then
    local filler = store:create_chat({ title = "filler" })
    local msgs = {}
    for i = 1, n do
      msgs[i] = { role = "user", content = "filler " .. i }
    end
    store:append(filler, msgs)
  end
  return store
end

-- The promote/resume publish of the seed: history 3, 4 in the chat; the
-- promote commits 5 (tool) and 6 (user) in one transaction; the resumed
-- worker commits 7 (assistant). Returns the two stepped publishes.
local function seed_commits(promote_store, worker_store, chat)
  local promote = promote_store:prepare(chat, {
    { role = "tool", content = '{"result":"interrupted by a queued message"}' },
    { role = "user", content = "the queued message" },
  })
  assert.are.same({ 5, 6 }, promote:commit())
  local worker = worker_store:prepare(chat, { role = "assistant", content = "the reply" })
  assert.are.same({ 7 }, worker:commit())
  return promote, worker
end

-- A chat whose history is 3, 4 (ids 1, 2 go to another chat).
local function seed_chat(store)
  local chat = store:create_chat({ owner = "alice", title = "seed" })
  assert.are.same({ 3, 4 }, store:append(chat, {
    { role = "user", content = "run the tool" },
    { role = "assistant", content = '{"tool_call":"client_tool"}' },
  }))
  return chat
end

local scenarios = {}

-- a) the seed's trace: cache appends 5, 7, 6; notifications after 4, after 6,
-- after 5; the reader runs its merge after the first notification.
scenarios[#scenarios + 1] = {
  name = "a) the seed's trace: cache 5, 7, 6; notifications after 4, 6, 5",
  last_id_lost = { 6 },
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 2)
    local chat = seed_chat(store)
    local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(store, store, chat)
    promote:cache(1)
    worker:cache()
    promote:notify(1) -- after 4
    local got = H.drain(sub)
    promote:cache(2) -- the promoted user message reaches the cache last
    worker:notify() -- after 6
    promote:notify(2) -- after 5
    H.drain(sub, got)
    return got, truth(db, chat, 4)
  end,
}

-- b) the same, with every DB pass failing: only the cache rescan can save 6.
scenarios[#scenarios + 1] = {
  name = "b) the seed's trace with the DB pass failing",
  last_id_lost = { 6 },
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 2)
    local chat = seed_chat(store)
    local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(store, store, chat)
    db:fail_queries(1000)
    promote:cache(1)
    worker:cache()
    promote:notify(1)
    local got = H.drain(sub)
    promote:cache(2)
    worker:notify()
    promote:notify(2)
    H.drain(sub, got)
    db:fail_queries(0)
    -- What was got while the DB failed is the result; nothing more is read.
    return got, truth(db, chat, 4)
  end,
}

-- c) subscribed with after = 100; the cache holds 96..101; a stale notification
-- (after 95) arrives: nothing at or below 100 may be delivered, 101 once.
-- The pre-fix algorithm is right here too (its cursor starts at 100).
scenarios[#scenarios + 1] = {
  name = "c) after = 100, cache 96..101, a stale notification after 95",
  last_id_lost = {},
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 0, { cache_size = 6 })
    local chat = store:create_chat({ owner = "alice" })
    local history = {}
    for i = 1, 95 do
      history[i] = { role = "user", content = "m" .. i }
    end
    store:append(chat, history)
    local p96 = store:prepare(chat, { role = "user", content = "m96" })
    assert.are.same({ 96 }, p96:commit())
    p96:cache(1) -- its notification is held back: it becomes the stale one
    for i = 97, 100 do
      store:append(chat, { role = "user", content = "m" .. i })
    end
    local sub = assert(store:subscribe(chat, { after = 100, strategy = strategy, ordered = ordered }))
    local p101 = store:prepare(chat, { role = "assistant", content = "m101" })
    assert.are.same({ 101 }, p101:commit())
    p101:cache(1)
    p96:notify(1) -- after 95
    local got = H.drain(sub)
    p101:notify(1)
    H.drain(sub, got)
    local stats = store:stats()
    assert.is_true(stats.cache_hits > 0)
    return got, truth(db, chat, 100)
  end,
}

-- d) subscribed with after = 5; the cache has 8; the DB also has 6 (committed
-- elsewhere, never published here): both, once each.
scenarios[#scenarios + 1] = {
  name = "d) after = 5, the cache has 8, the DB has 6 too",
  last_id_lost = { 6 },
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 0)
    local other = open_at(db, 0)
    local chat = store:create_chat({ owner = "alice" })
    local filler = store:create_chat({ title = "filler" })
    store:append(chat, {
      { role = "user", content = "1" }, { role = "user", content = "2" },
      { role = "user", content = "3" }, { role = "user", content = "4" },
      { role = "user", content = "5" },
    })
    local sub = assert(store:subscribe(chat, { after = 5, strategy = strategy, ordered = ordered }))
    local p6 = other:prepare(chat, { role = "user", content = "6" })
    assert.are.same({ 6 }, p6:commit()) -- on another replica, not yet published
    store:append(filler, { role = "user", content = "7" })
    assert.are.same({ 8 }, store:append(chat, { role = "assistant", content = "8" }))
    local got = H.drain(sub)
    p6:close()
    return got, truth(db, chat, 5)
  end,
}

-- e1) two replicas on one database: the publisher on A, the reader on B.
-- B's cache never sees these messages, so everything comes through the DB
-- pass, which reads a consistent prefix: every strategy is right.
scenarios[#scenarios + 1] = {
  name = "e1) two replicas: publisher on A, reader on B, all through the DB",
  last_id_lost = {},
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local a = open_at(db, 2)
    local b = open_at(db, 0)
    local chat = seed_chat(a)
    local sub = assert(b:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(a, a, chat)
    promote:cache(1)
    worker:cache()
    promote:notify(1)
    local got = H.drain(sub)
    promote:cache(2)
    worker:notify()
    promote:notify(2)
    H.drain(sub, got)
    local sb = b:stats()
    assert.is_true(sb.db_passes >= 1)
    return got, truth(db, chat, 4)
  end,
}

-- e2) two replicas: the promote runs on A, the resumed worker on B (the
-- reader's replica), so B's cache holds only 7 when "after 4" arrives.
scenarios[#scenarios + 1] = {
  name = "e2) two replicas: promote on A, the resumed worker on the reader's B",
  last_id_lost = { 5, 6 },
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local a = open_at(db, 2)
    local b = open_at(db, 0)
    local chat = seed_chat(a)
    local sub = assert(b:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(a, b, chat)
    promote:cache(1)
    worker:cache()
    promote:notify(1)
    local got = H.drain(sub)
    promote:cache(2)
    worker:notify()
    promote:notify(2)
    H.drain(sub, got)
    return got, truth(db, chat, 4)
  end,
}

-- f1) eviction: with a cache of 2, caching 6 evicts 5 after the reader went
-- past it; the late notifications look up from below the eviction mark.
scenarios[#scenarios + 1] = {
  name = "f1) cache eviction below the reader's position",
  last_id_lost = { 6 },
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 2, { cache_size = 2 })
    local chat = seed_chat(store)
    local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(store, store, chat)
    promote:cache(1)
    worker:cache()
    promote:notify(1)
    local got = H.drain(sub)
    promote:cache(2) -- evicts 5
    worker:notify()
    promote:notify(2)
    H.drain(sub, got)
    return got, truth(db, chat, 4)
  end,
}

-- f2) eviction far below a reader that fell behind: the lookup is a miss
-- (never a partial answer) and the DB pass fills the gap.
scenarios[#scenarios + 1] = {
  name = "f2) a reader behind the eviction mark gets a miss, then the DB",
  last_id_lost = {},
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 2, { cache_size = 3 })
    local chat = seed_chat(store)
    local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    for i = 1, 12 do
      store:append(chat, { role = "user", content = "burst " .. i })
    end
    local got = H.drain(sub)
    assert.is_true(store:stats().cache_misses >= 1)
    return got, truth(db, chat, 4)
  end,
}

-- f3) a dropped notification followed by a later one: the notification of 6
-- is lost; only message 8's notification comes after it.
scenarios[#scenarios + 1] = {
  name = "f3) a dropped notification, then a later one",
  last_id_lost = { 6 },
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 2)
    local chat = seed_chat(store)
    local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(store, store, chat)
    promote:cache(1)
    worker:cache()
    worker:notify() -- after 6, first
    local got = H.drain(sub)
    promote:cache(2)
    db:drop_notifies(2)
    promote:notify(1) -- dropped
    promote:notify(2) -- dropped
    H.drain(sub, got)
    store:append(chat, { role = "user", content = "a later message" }) -- 8
    H.drain(sub, got)
    return got, truth(db, chat, 4)
  end,
}

-- f4) the reader's notification queue overflows while it is busy: the queue
-- becomes one resync pass; nothing is lost.
scenarios[#scenarios + 1] = {
  name = "f4) a notification queue overflow turns into a resync",
  last_id_lost = { 6 },
  run = function(strategy, ordered)
    local db = chatstream.memory()
    local store = open_at(db, 2, { queue_size = 2 })
    local chat = seed_chat(store)
    local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(store, store, chat)
    promote:cache(1)
    worker:cache()
    promote:notify(1)
    local got = H.drain(sub)
    promote:cache(2)
    worker:notify()
    promote:notify(2)
    for i = 1, 5 do
      store:append(chat, { role = "user", content = "more " .. i })
    end
    store:step() -- route everything now: the queue of 2 overflows
    assert.is_true(store:stats().resyncs >= 1)
    H.drain(sub, got)
    return got, truth(db, chat, 4)
  end,
}

describe("race scenarios", function()
  for _, sc in ipairs(scenarios) do
    describe(sc.name, function()
      for _, strategy in ipairs(H.strategies) do
        it(strategy .. (strategy == "last_id" and " loses what the reference lost"
          or " delivers every message exactly once"), function()
          local got, want = sc.run(strategy)
          assert.is_true(#want > 0)
          local lost, dups = H.check(got, want)
          assert.are.same({}, dups)
          if strategy == "last_id" then
            assert.are.same(sc.last_id_lost, lost)
          else
            assert.are.same({}, lost)
            assert.are.equal(#want, #got)
          end
        end)
      end
      it("ordered watermark delivers the same messages in ascending order", function()
        local got, want = sc.run("watermark", true)
        assert.are.same(want, got)
      end)
    end)
  end
end)
