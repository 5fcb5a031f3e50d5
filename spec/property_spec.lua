-- spec/property_spec.lua - random publish interleavings checked against the database.
-- Each seed builds replicas (hubs on one memory database), chats, readers of
-- every strategy, and writers whose steps (commit, then cache and notify of
-- each message in turn; or one plain append) interleave at random with reads, evictions (small
-- caches), queue overflows (small queues), dropped notifications, failing
-- queries and, on some seeds, edits (store:edit: a cut of the history, a
-- truncate event). An oracle compares what every reader shows (its message
-- events, each truncate dropping what is above its cut) with the database.
-- On PostgreSQL the same runs go through real LISTEN/NOTIFY, without the
-- memory store's fault knobs (lost notifications are commits never notified).
-- CHATSTREAM_PROPERTY_SEEDS sets the number of seeds on the memory store
-- (default 2000), CHATSTREAM_PROPERTY_PG_SEEDS on PostgreSQL (default 60).
local H = require("helpers")

local SEEDS = {
  memory = tonumber(os.getenv("CHATSTREAM_PROPERTY_SEEDS") or "") or 2000,
  postgresql = tonumber(os.getenv("CHATSTREAM_PROPERTY_PG_SEEDS") or "") or 60,
}

local VARIANTS = {
  { name = "last_id", strategy = "last_id" },
  { name = "rescan", strategy = "rescan" },
  -- watermark delivering as found (ordered, its default, is the next row)
  { name = "watermark", strategy = "watermark", ordered = false },
  { name = "watermark+ordered", strategy = "watermark", ordered = true },
}

local function run_seed(inst, seed)
  math.randomseed(seed)
  local R = math.random
  local db = inst.memdb -- nil on PostgreSQL: no injected query failures
  local drops = seed % 3 == 0 -- lost notifications only on some seeds
  local fails = db and seed % 2 == 0
  local edits = seed % 4 == 1 -- edits only on some seeds
  local reps = {}
  for i = 1, R(1, 3) do
    reps[i] = inst:open({
      cache_size = R(1, 3) == 1 and 256 or R(1, 6),
      queue_size = R(2, 12),
      page_size = R(1, 2) == 1 and R(1, 4) or nil, -- DB passes in small pages
    })
  end
  local chats = {}
  for i = 1, R(1, 2) do
    chats[i] = reps[1]:create_chat({ owner = "p" })
    if R(0, 1) == 1 then
      reps[1]:append(chats[i], { role = "user", content = "history" })
    end
  end
  local committed = {} -- chat -> list of ids (the truth, ascending)
  local maxid = {} -- chat -> highest committed id
  local roles = {} -- id -> role (edits take a user message)
  for _, c in ipairs(chats) do
    committed[c], maxid[c] = {}, 0
    local sub = reps[1]:subscribe(c)
    for _, id in ipairs(H.drain(sub)) do
      committed[c][#committed[c] + 1] = id
      maxid[c] = id
      roles[id] = "user"
    end
    sub:close()
  end

  -- Notifications sent per chat, and each replica's count when it began
  -- to listen to the chat (its first subscription): what it must receive.
  local sent, listen_at = {}, {}
  for _, c in ipairs(chats) do
    sent[c] = 0
  end
  for _, rep in ipairs(reps) do
    listen_at[rep] = {}
  end
  local readers = {}
  local function add_reader(chat, after)
    for _, v in ipairs(VARIANTS) do
      local rep = reps[R(1, #reps)]
      local sub, err = rep:subscribe(chat, { after = after, strategy = v.strategy, ordered = v.ordered })
      if sub and not listen_at[rep][chat] then
        listen_at[rep][chat] = sent[chat]
      end
      if sub then
        readers[#readers + 1] = { sub = sub, chat = chat, after = after, variant = v.name, v = H.view() }
      else
        assert(err:match("^EBACKEND"), err) -- an injected failure: skip it
      end
    end
  end
  for _, c in ipairs(chats) do
    add_reader(c, 0)
  end

  local writers, started, total = {}, 0, R(3, 10)
  local function new_writer()
    started = started + 1
    local n = R(1, 3)
    local msgs = {}
    for i = 1, n do
      msgs[i] = { role = ({ "user", "assistant", "tool" })[R(1, 3)], content = "w" .. started .. "." .. i }
    end
    local chat = chats[R(1, #chats)]
    local rep = reps[R(1, #reps)]
    if n == 1 and R(1, 3) == 1 then
      -- A plain append: commit, cache and notify in one call (on
      -- PostgreSQL one statement whose notification carries the message).
      writers[#writers + 1] = { rep = rep, msg = msgs[1], chat = chat, steps = { "append" }, pos = 1 }
      return
    end
    if edits and R(1, 4) == 1 then
      writers[#writers + 1] = { rep = rep, chat = chat, steps = { "edit" }, pos = 1 }
      return
    end
    local steps = { "commit" }
    for i = 1, n do
      steps[#steps + 1] = { "cache", i }
      steps[#steps + 1] = { "notify", i }
    end
    writers[#writers + 1] = { pub = rep:prepare(chat, msgs), chat = chat, steps = steps, pos = 1, msgs = msgs }
  end

  -- An edit of a random live user message of the chat (none: a user
  -- message is appended instead): the truth loses it and everything after
  -- it, and gains the new message.
  local function edit(w)
    local list, users = committed[w.chat], {}
    for i, id in ipairs(list) do
      if roles[id] == "user" then
        users[#users + 1] = i
      end
    end
    if #users == 0 then
      local id = assert(w.rep:append(w.chat, { role = "user", content = "to edit" }))[1]
      list[#list + 1], maxid[w.chat], roles[id] = id, id, "user"
      sent[w.chat] = sent[w.chat] + 1
      return
    end
    local at = users[R(1, #users)]
    local nid = assert(w.rep:edit(w.chat, list[at], { content = "edited" }))
    for i = #list, at, -1 do
      list[i] = nil
    end
    list[#list + 1], maxid[w.chat], roles[nid] = nid, nid, "user"
    sent[w.chat] = sent[w.chat] + 3 -- the truncate, the message, the status
  end

  local lose_next = false -- PostgreSQL: the next notify step is skipped
  local function step_writer(w)
    local s = w.steps[w.pos]
    w.pos = w.pos + 1
    if type(s) == "table" and s[1] == "notify" and lose_next then
      lose_next = false
      return -- never sent, as if the publisher died before it
    end
    if s == "append" then
      local id = assert(w.rep:append(w.chat, w.msg))[1]
      local list = committed[w.chat]
      list[#list + 1] = id
      maxid[w.chat] = id
      roles[id] = w.msg.role
      sent[w.chat] = sent[w.chat] + 1
    elseif s == "edit" then
      edit(w)
    elseif s == "commit" then
      for i, id in ipairs(w.pub:commit()) do
        local list = committed[w.chat]
        list[#list + 1] = id
        maxid[w.chat] = id
        roles[id] = w.msgs[i].role
      end
    elseif s[1] == "cache" then
      w.pub:cache(s[2])
    else
      w.pub:notify(s[2])
      sent[w.chat] = sent[w.chat] + 1
    end
  end

  -- What the reader shows (H.view): a message goes at the end, a truncate
  -- drops what is above its cut.
  local function drain(r)
    for ev in r.sub:events(0) do
      H.view_take(r.v, ev)
    end
  end

  local live = true
  while live do
    local roll = R(1, 100)
    local pending = {}
    for _, w in ipairs(writers) do
      if w.pos <= #w.steps then
        pending[#pending + 1] = w
      end
    end
    if #pending == 0 and started >= total then
      live = false
    elseif roll <= 55 and #pending > 0 then
      step_writer(pending[R(1, #pending)])
    elseif roll <= 65 and started < total then
      new_writer()
    elseif roll <= 90 then
      drain(readers[R(1, #readers)])
    elseif roll <= 94 and drops then
      if db then
        db:drop_notifies(1)
      else
        lose_next = true
      end
    elseif roll <= 97 and fails then
      db:fail_queries(R(1, 3))
    elseif roll <= 100 and #readers < 60 then
      local c = chats[R(1, #chats)]
      local all = committed[c]
      -- from the start, the end, or (edits) anywhere: a cursor an edit may
      -- leave behind
      local after = R(0, 1) == 1 and maxid[c] or 0
      if edits and #all > 0 and R(1, 2) == 1 then
        after = all[R(1, #all)]
      end
      add_reader(c, after)
    end
  end

  -- The end: faults cleared, then one more message per chat, published
  -- normally, so every reader has a notification after the last drop.
  if db then
    db:drop_notifies(0)
    db:fail_queries(0)
  end
  for _, c in ipairs(chats) do
    local id = reps[R(1, #reps)]:append(c, { role = "assistant", content = "final" })[1]
    committed[c][#committed[c] + 1] = id
    sent[c] = sent[c] + 1
  end
  if not db then
    -- PostgreSQL delivers asynchronously: wait until every replica's hub has
    -- every notification sent on its chats since it began to listen.
    for _, rep in ipairs(reps) do
      local want = 0
      for c, at in pairs(listen_at[rep]) do
        want = want + sent[c] - at
      end
      H.settle(rep, want)
    end
  end
  for _ = 1, 2 do
    for _, r in ipairs(readers) do
      drain(r)
    end
  end

  local results = {}
  for _, r in ipairs(readers) do
    local want = {}
    for _, id in ipairs(committed[r.chat]) do
      if id > r.after then
        want[#want + 1] = id
      end
    end
    local got = r.v.ids
    local lost, dups = H.check(got, want)
    local ascending = true
    for i = 2, #got do
      ascending = ascending and got[i] > got[i - 1]
    end
    -- shown but not in the history: removed by an edit, or never written
    local in_history, extra = {}, 0
    for _, id in ipairs(want) do
      in_history[id] = true
    end
    for _, id in ipairs(got) do
      if not in_history[id] then
        extra = extra + 1
      end
    end
    results[#results + 1] = { variant = r.variant, lost = #lost, dups = #dups + #r.v.twice, ascending = ascending,
      extra = extra, truncates = r.v.truncates }
    r.sub:close()
  end
  for _, w in ipairs(writers) do
    if w.pub then
      w.pub:close()
    end
  end
  for _, rep in ipairs(reps) do
    rep:close()
  end
  return results, drops
end

describe("random interleavings", function()
  H.each_backend(_ENV, function(kind)
    local seeds = SEEDS[kind]
    local totals = {}
    for _, v in ipairs(VARIANTS) do
      totals[v.name] = { readers = 0, lost = 0, dups = 0, seeds_lost = 0, lost_nodrop = 0, unordered = 0,
        extra = 0, extra_nodrop = 0, truncates = 0 }
    end

    setup(function()
      for seed = 1, seeds do
        local results, drops
        H.with_instance(kind, function(inst)
          results, drops = run_seed(inst, seed)
        end)
        local lost_here = {}
        for _, r in ipairs(results) do
          local t = totals[r.variant]
          t.readers = t.readers + 1
          t.lost = t.lost + r.lost
          t.dups = t.dups + r.dups
          t.extra = t.extra + r.extra
          t.truncates = t.truncates + r.truncates
          if not drops then
            t.lost_nodrop = t.lost_nodrop + r.lost
            t.extra_nodrop = t.extra_nodrop + r.extra
          end
          if not r.ascending then
            t.unordered = t.unordered + 1
          end
          if r.lost > 0 then
            lost_here[r.variant] = true
          end
        end
        for name in pairs(lost_here) do
          totals[name].seeds_lost = totals[name].seeds_lost + 1
        end
      end
      local lines = {
        string.format("\nproperty on %s: %d seeds (1..%d)", kind, seeds, seeds),
        string.format("%-18s %8s %8s %6s %6s %10s %12s %14s", "strategy", "readers", "lost", "dups",
          "extra", "truncates", "seeds_lost", "lost_no_drops"),
      }
      for _, v in ipairs(VARIANTS) do
        local t = totals[v.name]
        lines[#lines + 1] = string.format("%-18s %8d %8d %6d %6d %10d %12d %14d", v.name, t.readers, t.lost,
          t.dups, t.extra, t.truncates, t.seeds_lost, t.lost_nodrop)
      end
      io.stderr:write(table.concat(lines, "\n"), "\n")
    end)

    it("watermark loses nothing and duplicates nothing", function()
      assert.are.equal(0, totals.watermark.lost)
      assert.are.equal(0, totals.watermark.dups)
      assert.is_true(totals.watermark.readers > seeds)
    end)

    it("no strategy shows a message an edit removed, and the edits are hit", function()
      -- last_id skips the DB whenever its cache gives something: when the
      -- truncate notification is lost, it may never look (its own rule,
      -- as with the messages it loses); with every notification, never.
      for _, v in ipairs(VARIANTS) do
        local t = totals[v.name]
        assert.are.equal(0, v.name == "last_id" and t.extra_nodrop or t.extra, v.name)
        assert.is_true(t.truncates > 0, v.name)
      end
    end)

    it("ordered watermark loses nothing, duplicates nothing and is ascending", function()
      local t = totals["watermark+ordered"]
      assert.are.equal(0, t.lost)
      assert.are.equal(0, t.dups)
      assert.are.equal(0, t.unordered)
    end)

    it("rescan duplicates nothing and loses nothing unless a notification was lost", function()
      -- A lost notification is found by rescan only if a later one rescans
      -- below it (the reference's gap); without losses it must be exact.
      assert.are.equal(0, totals.rescan.dups)
      assert.are.equal(0, totals.rescan.lost_nodrop)
    end)

    it("last_id loses messages in some seeds (the race is hit)", function()
      assert.is_true(totals.last_id.seeds_lost > 0)
      assert.is_true(totals.last_id.lost_nodrop > 0)
    end)
  end)
end)
