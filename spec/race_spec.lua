-- spec/race_spec.lua - deterministic promote/resume races, run under every strategy.
-- Each scenario replays a publish interleaving step by step, on every store of
-- the matrix. rescan and watermark must deliver every message exactly once;
-- last_id (the algorithm before the reference fix) must show the loss the
-- reference describes, which proves the scenario really hits the race.
local H = require("helpers")

-- Ids the reader should have, from the database (a fresh replica's snapshot).
local function truth(inst, chat_id, after)
  local store = inst:open()
  local sub = assert(store:subscribe(chat_id, { after = after }))
  local ids = H.drain(sub)
  sub:close()
  return ids
end

-- Counts the notifications a reader's hub must receive, so that a drain
-- happens exactly after them on every store (on PostgreSQL they arrive
-- asynchronously).
local function tracker(reader)
  local t = { sent = 0 }
  function t.notify(p, i, n)
    p:notify(i)
    t.sent = t.sent + (n or 1)
  end
  function t.append(store, chat, msgs)
    local ids = store:append(chat, msgs)
    t.sent = t.sent + #ids
    return ids
  end
  function t.drain(sub, got)
    H.settle(reader, t.sent)
    return H.drain(sub, got)
  end
  return t
end

-- n filler messages in another chat, so the next ids start at n + 1.
local function filler(store, n)
  local chat = store:create_chat({ title = "filler" })
  local msgs = {}
  for i = 1, n do
    msgs[i] = { role = "user", content = "filler " .. i }
  end
  store:append(chat, msgs)
  return chat
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
  filler(store, 2)
  local chat = store:create_chat({ owner = "alice", title = "seed" })
  assert.are.same({ 3, 4 }, store:append(chat, {
    { role = "user", content = "run the tool" },
    { role = "assistant", content = '{"tool_call":"client_tool"}' },
  }))
  return chat
end

-- One store (opened with opts) that both publishes and reads: the seed chat,
-- a tracker, a reader subscribed after 4, and the two committed publishes.
local function seed_setup(inst, opts, strategy, ordered)
  local store = inst:open(opts)
  local chat = seed_chat(store)
  local t = tracker(store)
  local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
  local promote, worker = seed_commits(store, store, chat)
  return store, chat, t, sub, promote, worker
end

local scenarios = {}

-- The seed's publish order with a drain after the first notification:
-- cache 5, 7; notify after 4; [reader merges]; cache 6; notify after 6, after 5.
local function seed_publish(t, reader_sub, promote, worker, between)
  promote:cache(1)
  worker:cache()
  t.notify(promote, 1) -- after 4
  local got = t.drain(reader_sub)
  if between then
    between()
  end
  promote:cache(2) -- the promoted user message reaches the cache last
  t.notify(worker) -- after 6
  t.notify(promote, 2) -- after 5
  return t.drain(reader_sub, got)
end

-- a) the seed's trace: cache appends 5, 7, 6; notifications after 4, after 6,
-- after 5; the reader runs its merge after the first notification.
scenarios[#scenarios + 1] = {
  name = "a) the seed's trace: cache 5, 7, 6; notifications after 4, 6, 5",
  last_id_lost = { 6 },
  run = function(inst, strategy, ordered)
    local _, chat, t, sub, promote, worker = seed_setup(inst, nil, strategy, ordered)
    return seed_publish(t, sub, promote, worker), truth(inst, chat, 4)
  end,
}

-- b) the same, with every DB pass failing: only the cache rescan can save 6.
-- (The failure knob is the memory store's.)
scenarios[#scenarios + 1] = {
  name = "b) the seed's trace with the DB pass failing",
  memory_only = true,
  last_id_lost = { 6 },
  run = function(inst, strategy, ordered)
    local _, chat, t, sub, promote, worker = seed_setup(inst, nil, strategy, ordered)
    inst.memdb:fail_queries(1000)
    local got = seed_publish(t, sub, promote, worker)
    inst.memdb:fail_queries(0)
    -- What was got while the DB failed is the result; nothing more is read.
    return got, truth(inst, chat, 4)
  end,
}

-- c) subscribed with after = 100; the cache holds 96..101; a stale notification
-- (after 95) arrives: nothing at or below 100 may be delivered, 101 once.
-- The pre-fix algorithm is right here too (its cursor starts at 100).
scenarios[#scenarios + 1] = {
  name = "c) after = 100, cache 96..101, a stale notification after 95",
  last_id_lost = {},
  run = function(inst, strategy, ordered)
    local store = inst:open({ cache_size = 6 })
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
    local t = tracker(store)
    local sub = assert(store:subscribe(chat, { after = 100, strategy = strategy, ordered = ordered }))
    local p101 = store:prepare(chat, { role = "assistant", content = "m101" })
    assert.are.same({ 101 }, p101:commit())
    p101:cache(1)
    t.notify(p96, 1) -- after 95
    local got = t.drain(sub)
    t.notify(p101, 1)
    t.drain(sub, got)
    assert.is_true(store:stats().cache_hits > 0)
    return got, truth(inst, chat, 100)
  end,
}

-- d) subscribed with after = 5; the cache has 8; the DB also has 6 (committed
-- on another replica, never published): both, once each.
scenarios[#scenarios + 1] = {
  name = "d) after = 5, the cache has 8, the DB has 6 too",
  last_id_lost = { 6 },
  run = function(inst, strategy, ordered)
    local store = inst:open()
    local other = inst:open()
    local chat = store:create_chat({ owner = "alice" })
    local fill = store:create_chat({ title = "filler" })
    store:append(chat, {
      { role = "user", content = "1" }, { role = "user", content = "2" },
      { role = "user", content = "3" }, { role = "user", content = "4" },
      { role = "user", content = "5" },
    })
    local t = tracker(store)
    local sub = assert(store:subscribe(chat, { after = 5, strategy = strategy, ordered = ordered }))
    local p6 = other:prepare(chat, { role = "user", content = "6" })
    assert.are.same({ 6 }, p6:commit()) -- on another replica, not yet published
    store:append(fill, { role = "user", content = "7" })
    assert.are.same({ 8 }, t.append(store, chat, { role = "assistant", content = "8" }))
    local got = t.drain(sub)
    p6:close()
    return got, truth(inst, chat, 5)
  end,
}

-- e1) two replicas on one database: the publisher on A, the reader on B.
-- B's cache never sees these messages, so everything comes through the DB
-- pass, which reads a consistent prefix: every strategy is right.
scenarios[#scenarios + 1] = {
  name = "e1) two replicas: publisher on A, reader on B, all through the DB",
  last_id_lost = {},
  run = function(inst, strategy, ordered)
    local a = inst:open()
    local b = inst:open()
    local chat = seed_chat(a)
    local t = tracker(b)
    local sub = assert(b:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(a, a, chat)
    local got = seed_publish(t, sub, promote, worker)
    assert.is_true(b:stats().db_passes >= 1)
    return got, truth(inst, chat, 4)
  end,
}

-- e2) two replicas: the promote runs on A, the resumed worker on B (the
-- reader's replica), so B's cache holds only 7 when "after 4" arrives.
scenarios[#scenarios + 1] = {
  name = "e2) two replicas: promote on A, the resumed worker on the reader's B",
  last_id_lost = { 5, 6 },
  run = function(inst, strategy, ordered)
    local a = inst:open()
    local b = inst:open()
    local chat = seed_chat(a)
    local t = tracker(b)
    local sub = assert(b:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    local promote, worker = seed_commits(a, b, chat)
    return seed_publish(t, sub, promote, worker), truth(inst, chat, 4)
  end,
}

-- f1) eviction: with a cache of 2, caching 6 evicts 5 after the reader went
-- past it; the late notifications look up from below the eviction mark.
scenarios[#scenarios + 1] = {
  name = "f1) cache eviction below the reader's position",
  last_id_lost = { 6 },
  run = function(inst, strategy, ordered)
    local _, chat, t, sub, promote, worker = seed_setup(inst, { cache_size = 2 }, strategy, ordered)
    return seed_publish(t, sub, promote, worker), truth(inst, chat, 4)
  end,
}

-- f2) eviction far below a reader that fell behind: the lookup is a miss
-- (never a partial answer) and the DB pass fills the gap.
scenarios[#scenarios + 1] = {
  name = "f2) a reader behind the eviction mark gets a miss, then the DB",
  last_id_lost = {},
  run = function(inst, strategy, ordered)
    local store = inst:open({ cache_size = 3 })
    local chat = seed_chat(store)
    local t = tracker(store)
    local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy, ordered = ordered }))
    for i = 1, 12 do
      t.append(store, chat, { role = "user", content = "burst " .. i })
    end
    local got = t.drain(sub)
    assert.is_true(store:stats().cache_misses >= 1)
    return got, truth(inst, chat, 4)
  end,
}

-- f3) lost notifications followed by a later one: the promote's two
-- notifications never arrive; only message 8's notification comes after them.
scenarios[#scenarios + 1] = {
  name = "f3) lost notifications, then a later one",
  last_id_lost = { 6 },
  run = function(inst, strategy, ordered)
    local store, chat, t, sub, promote, worker = seed_setup(inst, nil, strategy, ordered)
    promote:cache(1)
    worker:cache()
    t.notify(worker) -- after 6, first
    local got = t.drain(sub)
    promote:cache(2)
    if inst.memdb then
      inst.memdb:drop_notifies(2) -- sent, and lost on the way
      promote:notify(1)
      promote:notify(2)
    else
      promote:close() -- never sent: the publisher died after its cache step
    end
    t.drain(sub, got)
    t.append(store, chat, { role = "user", content = "a later message" }) -- 8
    t.drain(sub, got)
    return got, truth(inst, chat, 4)
  end,
}

-- f4) the reader's notification queue overflows while it is busy: the queue
-- becomes one resync pass; nothing is lost.
scenarios[#scenarios + 1] = {
  name = "f4) a notification queue overflow turns into a resync",
  last_id_lost = { 6 },
  run = function(inst, strategy, ordered)
    local store, chat, t, sub, promote, worker = seed_setup(inst, { queue_size = 2 }, strategy, ordered)
    local got = seed_publish(t, sub, promote, worker, function()
      for i = 1, 5 do
        t.append(store, chat, { role = "user", content = "more " .. i })
      end
    end)
    assert.is_true(store:stats().resyncs >= 1)
    return got, truth(inst, chat, 4)
  end,
}

describe("race scenarios", function()
  H.each_backend(_ENV, function(kind)
    for _, sc in ipairs(scenarios) do
      if kind == "memory" or not sc.memory_only then
        describe(sc.name, function()
          for _, strategy in ipairs(H.strategies) do
            local says = strategy == "last_id" and " loses what the reference lost"
              or " delivers every message exactly once"
            it(strategy .. says, function()
              H.with_instance(kind, function(inst)
                local got, want = sc.run(inst, strategy)
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
            end)
          end
          it("watermark (ordered, the default) delivers the messages in ascending order", function()
            H.with_instance(kind, function(inst)
              local got, want = sc.run(inst, "watermark")
              assert.are.same(want, got)
            end)
          end)
          it("watermark with ordered = false delivers every message exactly once", function()
            H.with_instance(kind, function(inst)
              local got, want = sc.run(inst, "watermark", false)
              local lost, dups = H.check(got, want)
              assert.are.same({}, lost)
              assert.are.same({}, dups)
            end)
          end)
        end)
      end
    end
  end)
end)
