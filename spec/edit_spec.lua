-- spec/edit_spec.lua - store:edit and the truncate event, on both stores:
-- the edit's transaction, its refusals, what every subscriber is handed
-- (live, resumed, after missed notifications) and the races of an edit
-- against a worker's append and against the seed's promote/resume, under
-- every strategy.
local chatstream = require("chatstream")
local H = require("helpers")

-- Every strategy, and the watermark unordered: four readers.
local READERS = {
  { strategy = "watermark" },
  { strategy = "watermark", ordered = false },
  { strategy = "rescan" },
  { strategy = "last_id" },
}

local function reader_name(r)
  return r.strategy .. (r.ordered == false and " (unordered)" or "")
end

-- Steps the store until no notification has arrived for `idle` seconds (at
-- once on the memory store, whose notifications are delivered by then).
local function quiet(store, idle)
  if store:kind() ~= "postgresql" then
    store:step(0)
    return
  end
  idle = idle or 0.3
  local seen, still = store:stats().notifications, chatstream.now()
  local deadline = chatstream.now() + 10
  while chatstream.now() - still < idle and chatstream.now() < deadline do
    store:step(0.05)
    local n = store:stats().notifications
    if n ~= seen then
      seen, still = n, chatstream.now()
    end
  end
end

-- A reader: its events (r.evs) and what it shows (H.view: r.view the ids,
-- r.shown, r.twice the ids handed twice in one history).
local function reader(sub)
  local r = { evs = {}, v = H.view() }
  r.shown, r.twice = r.v.shown, r.v.twice
  function r.take(timeout)
    for ev in sub:events(timeout or 0) do
      r.evs[#r.evs + 1] = ev
      H.view_take(r.v, ev)
    end
    r.view = r.v.ids
    return r
  end
  function r.kinds()
    local t = {}
    for _, ev in ipairs(r.evs) do
      if ev.kind == "message" or ev.kind == "truncate" then
        t[#t + 1] = ev.kind == "message" and ev.id or ("t" .. ev.after)
      end
    end
    return t
  end
  function r.truncates()
    local t = {}
    for _, ev in ipairs(r.evs) do
      if ev.kind == "truncate" then
        t[#t + 1] = ev
      end
    end
    return t
  end
  return r
end

-- The chat's live history, as a fresh replica's snapshot reads it.
local function truth(inst, chat)
  local s = inst:open()
  local sub = assert(s:subscribe(chat))
  local ids = H.drain(sub)
  sub:close()
  return ids
end

-- Readers of every kind (READERS) on each store of `where` ({name, store}
-- pairs; a name of "" for one store), named "<store name> <reader kind>".
local function readers_on(chat, where)
  local list = {}
  for _, w in ipairs(where) do
    for _, opts in ipairs(READERS) do
      local r = reader(assert(w[2]:subscribe(chat, opts)))
      r.name = (w[1] ~= "" and w[1] .. " " or "") .. reader_name(opts)
      r.ordered = opts.strategy == "watermark" and opts.ordered ~= false
      list[#list + 1] = r
    end
  end
  return list
end

-- Every notification in (quiet on each store), then every reader's events.
local function settle(stores, readers)
  for _, st in ipairs(stores) do
    quiet(st)
  end
  for _, r in ipairs(readers) do
    r.take()
  end
end

local function sorted(t)
  local c = { table.unpack(t) }
  table.sort(c)
  return c
end

-- A chat with a finished turn (u1, a1), a running one on worker w (u2, a2)
-- and one message queued behind it.
local function two_turns(store)
  local chat = store:create_chat({ owner = "alice", title = "edits" })
  local ids = {}
  ids.u1 = assert(store:send(chat, { content = "first question" }))
  assert.are.same({ chat }, store:acquire({ worker = "w" }))
  ids.a1 = store:append(chat, { role = "assistant", content = "first answer" }, { worker = "w" })[1]
  assert(store:finish(chat, "completed", { worker = "w" }))
  ids.u2 = assert(store:send(chat, { content = "second question" }))
  assert.are.same({ chat }, store:acquire({ worker = "w" }))
  ids.a2 = store:append(chat, { role = "assistant", content = "second answer, partial" }, { worker = "w" })[1]
  local q, queued = store:send(chat, { content = "queued meanwhile" })
  assert.is_true(queued)
  ids.q = q
  return chat, ids
end

-- Rows of the test server (PostgreSQL specs only).
local function psql_value(sql)
  local f = assert(io.popen(string.format("env -u LD_PRELOAD psql -X -q -t -A %q -c %q 2>&1", H.dsn, sql)))
  local out = f:read("a")
  f:close()
  return (out:gsub("%s+$", ""))
end

describe("store:edit", function()
  H.each_backend(_ENV, function(kind)
    local inst
    before_each(function()
      inst = H.new_instance(kind)
    end)
    after_each(function()
      inst:close()
    end)

    it("cuts the history at the edited message: the new content follows its prev_id; queue cleared, "
      .. "worker let go, pending", function()
      local store = inst:open()
      local chat, ids = two_turns(store)
      local nid = assert(store:edit(chat, ids.u2, { content = "second question, edited", actor = "alice" }))
      assert.is_true(nid > ids.a2)
      local c = store:chat(chat)
      assert.are.equal("pending", c.status)
      assert.is_nil(c.worker)
      assert.is_nil(c.interrupted_worker)
      assert.are.equal(1, c.history)
      assert.are.equal(nid, c.last_message_id)
      assert.are.same({}, store:queued(chat))
      local sub = assert(inst:open():subscribe(chat))
      local msgs = {}
      for ev in sub:events(0) do
        if ev.kind == "message" then
          msgs[#msgs + 1] = ev
        end
      end
      assert.are.same({ ids.u1, ids.a1, nid }, { msgs[1].id, msgs[2].id, msgs[3].id })
      assert.are.equal(3, #msgs)
      assert.are.equal(ids.a1, msgs[3].prev_id)
      assert.are.equal("user", msgs[3].role)
      assert.are.equal("second question, edited", msgs[3].content)
      -- The worker that was on the chat writes nothing after the cut.
      local ok, err, code = store:append(chat, { role = "assistant", content = "late" }, { worker = "w" })
      assert.is_nil(ok)
      assert.are.equal("ESTATE", code, err)
      assert.is_false((store:heartbeat(chat, "w")))
      local _, _, fcode = store:finish(chat, "completed", { worker = "w" })
      assert.are.equal("ESTATE", fcode)
      -- The next worker takes the edited turn.
      assert.are.same({ chat }, store:acquire({ worker = "w2" }))
      local reply = store:append(chat, { role = "assistant", content = "answer to the edit" }, { worker = "w2" })[1]
      assert.are.same({ ids.u1, ids.a1, nid, reply }, truth(inst, chat))
      if kind == "postgresql" then
        -- Kept as soft-deleted rows: the edited message and its answer.
        assert.are.equal(
          tostring(ids.u2) .. "," .. tostring(ids.a2),
          psql_value(("SELECT string_agg(id::text, ',' ORDER BY id) FROM %s.messages WHERE deleted")
            :format(inst.schema))
        )
        assert.are.equal(
          ("1|%d|%d"):format(ids.a1, nid),
          psql_value(("SELECT history || '|' || after || '|' || id FROM %s.cuts"):format(inst.schema))
        )
      end
    end)

    it("refuses the parts of the worker it let go (publish_part with its worker), not the next worker's",
      function()
      local store = inst:open()
      local chat, ids = two_turns(store)
      assert(store:publish_part(chat, "of the cut turn ", { worker = "w" }))
      local sub = assert(store:subscribe(chat))
      quiet(store)
      for _ in sub:events(0) do end
      local nid = assert(store:edit(chat, ids.u2, { content = "edited" }))
      local ok, err, code = store:publish_part(chat, "stale token", { worker = "w" })
      assert.is_nil(ok)
      assert.are.equal("ESTATE", code, err)
      assert.are.same({ chat }, store:acquire({ worker = "w2" }))
      assert(store:publish_part(chat, "fresh token", { worker = "w2" }))
      quiet(store)
      local parts = {}
      for ev in sub:events(0) do
        if ev.kind == "part" then
          parts[#parts + 1] = ev.text .. "@" .. ev.after
        end
      end
      assert.are.same({ "fresh token@" .. nid }, parts)
      local late = {}
      for ev in inst:open():subscribe(chat):events(0) do
        if ev.kind == "part" then
          late[#late + 1] = ev.text
        end
      end
      assert.are.same({ "fresh token" }, late)
      H.contains("exclude each other", H.raises(store.publish_part, store, chat, "x", { worker = "w2", actor = "a" }))
    end)

    it("edits the first message (the cut is at 0) and an edited message again", function()
      local store = inst:open()
      local chat = store:create_chat({ owner = "alice" })
      local u1 = store:send(chat, { content = "hello" })
      local n1 = assert(store:edit(chat, u1, { content = "hello again" }))
      local n2 = assert(store:edit(chat, n1, { content = "hello, third try" }))
      assert.are.same({ n2 }, truth(inst, chat))
      local c = store:chat(chat)
      assert.are.equal(2, c.history)
      local sub = assert(inst:open():subscribe(chat))
      local r = reader(sub).take()
      assert.are.same({ n2 }, r.view)
      assert.are.equal(0, r.evs[#r.evs].prev_id)
    end)

    it("refuses what is not a live user message of the chat, an archived chat and a stranger, writing nothing",
      function()
      local store = inst:open()
      local chat, ids = two_turns(store)
      local other = store:create_chat({ owner = "alice" })
      local o1 = store:send(other, { content = "elsewhere" })
      local before = truth(inst, chat)
      local function refused(want, mid, opts)
        local ok, err, code = store:edit(chat, mid, opts or { content = "x" })
        assert.is_nil(ok)
        assert.are.equal(want, code, err)
        return err
      end
      H.contains("user message", refused("EINVAL", ids.a1)) -- an assistant's
      refused("EINVAL", ids.a2 + 1000) -- no such message
      refused("EINVAL", o1) -- another chat's
      refused("EAUTH", ids.u2, { content = "x", actor = "mallory" })
      local nid = assert(store:edit(chat, ids.u2, { content = "y" }))
      refused("EINVAL", ids.u2) -- removed by the edit
      assert(store:archive(chat))
      refused("ESTATE", nid)
      assert(store:unarchive(chat))
      local c = store:chat(chat)
      assert.are.equal(1, c.history)
      assert.are.same({ ids.u1, ids.a1, nid }, truth(inst, chat))
      assert.are_not.same(before, truth(inst, chat))
      H.contains("must be a string", H.raises(store.edit, store, chat, nid, { content = 1 }))
      H.contains("message id", H.raises(store.edit, store, chat, 0, { content = "x" }))
      H.contains("unknown option", H.raises(store.edit, store, chat, nid, { content = "x", colour = 1 }))
    end)

    it("hands every subscriber a truncate at the cut, then the new message, in this process and on a replica",
      function()
      local store = inst:open()
      local replica = inst:open()
      local chat, ids = two_turns(store)
      local readers = readers_on(chat, { { "same store", store }, { "replica", replica } })
      quiet(store)
      quiet(replica)
      for _, r in ipairs(readers) do
        r.take()
        assert.are.same({ ids.u1, ids.a1, ids.u2, ids.a2 }, sorted(r.view), r.name)
      end
      local nid = assert(store:edit(chat, ids.u2, { content = "edited" }))
      quiet(store)
      quiet(replica)
      for _, r in ipairs(readers) do
        local n0 = #r.evs
        r.take()
        local tail = { table.unpack(r.evs, n0 + 1) }
        local kinds = {}
        for _, ev in ipairs(tail) do
          kinds[#kinds + 1] = ev.kind
        end
        local t = r.truncates()
        assert.are.equal(1, #t, r.name .. ": " .. table.concat(kinds, " "))
        assert.are.equal(ids.a1, t[1].after, r.name)
        assert.are.equal(1, t[1].history, r.name)
        assert.are.equal(chat, t[1].chat_id, r.name)
        assert.is_true(t[1].cursor <= ids.a1, r.name)
        assert.are.same({ ids.u1, ids.a1, nid }, r.view, r.name)
        assert.are.same({}, r.twice, r.name)
        -- the truncate comes before the new message
        local ti, mi
        for i, ev in ipairs(tail) do
          if ev.kind == "truncate" then
            ti = i
          elseif ev.kind == "message" and ev.id == nid then
            mi = i
          end
        end
        assert.is_true(ti < mi, r.name)
        assert.are.equal(nid, tail[mi].cursor, r.name)
      end
      assert.is_true(store:stats().truncates >= 4)
    end)

    it("resumes across a cut: a cursor the edit left behind gets the truncate first, a cursor past it nothing again",
      function()
      local store = inst:open()
      local chat, ids = two_turns(store)
      local sub = assert(store:subscribe(chat))
      local r = reader(sub)
      quiet(store)
      r.take()
      local stale = sub:cursor()
      assert.are.equal(ids.a2, stale)
      local nid = assert(store:edit(chat, ids.u2, { content = "edited" }))
      quiet(store)
      r.take()
      local t = r.truncates()[1]
      for _, page in ipairs({ 0, 1 }) do
        local s2 = inst:open(page > 0 and { page_size = page } or nil)
        -- the cursor before the edit: the removed messages are taken back
        local r2 = reader(assert(s2:subscribe(chat, { after = stale }))).take()
        assert.are.same({ "t" .. ids.a1, nid }, r2.kinds(), "page " .. page)
        -- the truncate's own cursor: the new message, no truncate
        local r3 = reader(assert(s2:subscribe(chat, { after = t.cursor }))).take()
        assert.are.same({ nid }, r3.kinds(), "page " .. page)
        -- the new message's cursor: nothing
        local r4 = reader(assert(s2:subscribe(chat, { after = nid }))).take()
        assert.are.same({}, r4.kinds(), "page " .. page)
      end
    end)

    it("catches up with an edit whose notifications never came (the poll, or the next DB pass, sees the history)",
      function()
      local store = inst:open()
      local chat, ids = two_turns(store)
      local replica = inst:open({ poll_interval = 0.1 })
      local readers = readers_on(chat, { { "", replica } })
      settle({ replica }, readers)
      -- The edit commits; its publish never runs (its process died).
      local p = assert(store:edit(chat, ids.u2, { content = "edited", prepare = true }))
      local nid = p:commit()[1]
      -- The next turn is published as usual.
      assert.are.same({ chat }, store:acquire({ worker = "w2" }))
      local reply = store:append(chat, { role = "assistant", content = "the reply" }, { worker = "w2" })[1]
      local want = { ids.u1, ids.a1, nid, reply }
      assert.are.same(want, truth(inst, chat))
      local deadline = chatstream.now() + 10
      for _, r in ipairs(readers) do
        repeat
          r.take(0.1)
        until #r.view == 4 and r.shown[nid] or chatstream.now() > deadline
        assert.are.same(want, sorted(r.view), r.name) -- unordered: any order
        assert.are.equal(1, #r.truncates(), r.name)
        assert.are.equal(ids.a1, r.truncates()[1].after, r.name)
      end
      assert.is_true(replica:stats().cut_reads >= 1)
    end)

    if kind == "postgresql" then
      it("hands the truncate to readers in this process when another OS process edits while it appends", function()
        local P = require("support.procs")
        local store = inst:open()
        local chat, ids = two_turns(store)
        local readers = readers_on(chat, { { "", store } })
        -- the other process: ten appends, the edit, ten more
        local script = os.tmpname()
        local f = assert(io.open(script, "w"))
        f:write([[
local chatstream = require("chatstream")
local dsn, schema, chat, mid = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4])
local s = assert(chatstream.open({ dsn = dsn, schema = schema, poll_interval = 0 }))
for i = 1, 10 do assert(s:append(chat, { role = "assistant", content = "before " .. i })) end
assert(s:edit(chat, mid, { content = "edited elsewhere" }))
for i = 1, 10 do assert(s:append(chat, { role = "assistant", content = "after " .. i })) end
io.write("done")
]])
        f:close()
        local procs = {}
        local w = P.spawn(procs, script, { H.dsn, inst.schema, tostring(chat), tostring(ids.u2) })
        local deadline = chatstream.now() + 30
        while not P.slurp(w.out):find("exit", 1, true) and chatstream.now() < deadline do
          for _, r in ipairs(readers) do
            r.take(0.02)
          end
        end
        w.h:close()
        os.remove(script)
        assert.are.equal("done", (P.slurp(w.out):match("^pid %d+\n(.-)exit") or ""), P.slurp(w.err))
        local want = truth(inst, chat)
        assert.are.equal(3 + 10, #want) -- u1, a1, the new message, ten after
        for _, r in ipairs(readers) do
          repeat
            r.take(0.1)
          until #r.view == #want or chatstream.now() > deadline
          assert.are.same(want, sorted(r.view), r.name)
          assert.are.equal(1, #r.truncates(), r.name)
          assert.are.same({}, r.twice, r.name)
        end
      end)
    end

    if kind == "memory" then
      it("catches up with an edit whose truncate notification was dropped (the next DB pass sees the history)",
        function()
        local store = inst:open()
        local chat, ids = two_turns(store)
        local replica = inst:open()
        local readers = readers_on(chat, { { "", replica } })
        settle({ replica }, readers)
        inst.memdb:drop_notifies(1) -- the truncate hint; the new message's comes
        local nid = assert(store:edit(chat, ids.u2, { content = "edited" }))
        for _, r in ipairs(readers) do
          r.take()
          assert.are.same({ ids.u1, ids.a1, nid }, r.view, r.name)
          assert.are.equal(1, #r.truncates(), r.name)
        end
        assert.is_true(replica:stats().cut_reads >= 1)
      end)

      it("a hub that missed an edit and then makes one keeps nothing the first removed", function()
        -- The writer's hub caches what it appends (no subscription: it
        -- hears no notification); an edit elsewhere removes those; then an
        -- edit here, whose cut is not the first one's. A paged reader here
        -- reads past its first page through the cache. (The fuzzer found
        -- it.)
        local store = inst:open({ page_size = 1 })
        local other = inst:open()
        local chat = store:create_chat({ owner = "alice" })
        local u1 = store:send(chat, { content = "one" })
        local a1 = store:append(chat, { role = "assistant", content = "two" })[1]
        local u2 = store:append(chat, { role = "user", content = "three" })[1]
        local a2 = store:append(chat, { role = "assistant", content = "four" })[1]
        local n1 = assert(other:edit(chat, u2, { content = "three, edited" }))
        local u3 = store:append(chat, { role = "user", content = "five" })[1]
        local n2 = assert(store:edit(chat, u3, { content = "five, edited" }))
        local want = { u1, a1, n1, n2 }
        assert.are.same(want, truth(inst, chat))
        for _, opts in ipairs(READERS) do
          local r = reader(assert(store:subscribe(chat, opts))).take()
          assert.are.same(want, sorted(r.view), reader_name(opts))
          assert.is_nil(r.shown[u2], reader_name(opts))
          assert.is_nil(r.shown[a2], reader_name(opts))
        end
      end)

      it("an unordered reader whose chain continues right at the cut still gets the truncate", function()
        -- The reader holds 2 and 3 out of order (1 not yet published, the
        -- DB passes failing: W is 0); an edit of 1 cuts at 0 and its
        -- truncate hint is lost. The new message follows W in the edited
        -- history: the chain looks whole, but what was handed over above W
        -- is gone. (The fuzzer found it.)
        local store = inst:open()
        local chat = store:create_chat({ owner = "alice" })
        local r = reader(assert(store:subscribe(chat, { strategy = "watermark", ordered = false })))
        local pubs = {}
        for i = 1, 3 do
          pubs[i] = store:prepare(chat, { role = "user", content = "m" .. i })
          pubs[i]:commit()
        end
        pubs[2]:publish()
        pubs[3]:publish()
        inst.memdb:fail_queries(100)
        r.take()
        assert.are.same({ 2, 3 }, r.view)
        inst.memdb:drop_notifies(1) -- the truncate hint
        local nid = assert(store:edit(chat, 1, { content = "edited" }))
        inst.memdb:drop_notifies(0)
        inst.memdb:fail_queries(0)
        pubs[1]:publish() -- late: removed by the edit
        r.take()
        assert.are.same({ nid }, r.view)
        assert.are.equal(1, #r.truncates())
        assert.are.same({ nid }, truth(inst, chat))
      end)

      it("a subscriber that joins after an edit its hub never heard of is not shown what the edit removed",
        function()
        -- The writer's hub has a removed message in its cache (its publish
        -- came before the edit) and another still to publish; the edit's
        -- notifications are lost. A reader joining there reads the edited
        -- history: neither may come back from the cache.
        local store = inst:open()
        local editor = inst:open()
        local chat, ids = two_turns(store)
        local p1 = assert(store:prepare(chat, { role = "assistant", content = "cached" }, { worker = "w" }))
        local x1 = p1:commit()[1]
        p1:cache()
        local p2 = assert(store:prepare(chat, { role = "assistant", content = "late" }, { worker = "w" }))
        local x2 = p2:commit()[1]
        inst.memdb:drop_notifies(10)
        local nid = assert(editor:edit(chat, ids.u2, { content = "edited" }))
        inst.memdb:drop_notifies(0)
        local want = { ids.u1, ids.a1, nid }
        local readers = readers_on(chat, { { "", store } })
        settle({ store }, readers)
        for _, r in ipairs(readers) do
          assert.are.same(want, r.view, r.name)
        end
        p1:notify()
        p2:cache()
        p2:notify()
        local p3 = assert(store:prepare(chat, { role = "assistant", content = "after" }))
        local after = p3:commit()[1]
        p3:publish()
        want[#want + 1] = after
        for _, r in ipairs(readers) do
          r.take()
          assert.are.same(want, sorted(r.view), r.name)
          assert.is_nil(r.shown[x1], r.name)
          assert.is_nil(r.shown[x2], r.name)
        end
      end)
    end
  end)
end)

describe("the races of an edit", function()
  H.each_backend(_ENV, function(kind)
    local inst
    before_each(function()
      inst = H.new_instance(kind)
    end)
    after_each(function()
      inst:close()
    end)

    -- The worker's append commits before the edit takes the chat's lock;
    -- its publish (cache, notification) comes after the edit's. The
    -- message is gone with the cut: no reader may show it after the
    -- truncate, on the writer's own hub (whose cache the late publish
    -- offers it to) or on a replica. An append after the edit fails.
    it("a worker's append committed before the cut and published after it never survives the cut, "
      .. "under every strategy", function()
      local store = inst:open()
      local replica = inst:open()
      local chat, ids = two_turns(store)
      local readers = readers_on(chat, { { "same store", store }, { "replica", replica } })
      settle({ store, replica }, readers)
      local late = assert(store:prepare(chat, { role = "assistant", content = "more of the answer" }, { worker = "w" }))
      local lid = late:commit()[1]
      local nid = assert(store:edit(chat, ids.u2, { content = "edited" }))
      assert.is_true(lid < nid, "the append committed before the edit")
      settle({ store, replica }, readers) -- the truncate and the new message
      late:cache()
      late:notify()
      quiet(store)
      quiet(replica)
      local want = { ids.u1, ids.a1, nid }
      assert.are.same(want, truth(inst, chat))
      for _, r in ipairs(readers) do
        r.take()
        assert.are.same(want, r.view, r.name)
        assert.is_nil(r.shown[lid], r.name)
        assert.are.same({}, r.twice, r.name)
      end
      -- The race was hit: the late publish offered the removed message to
      -- the writer's cache, which refused it.
      assert.are.equal(1, store:stats().cut_refused)
      local ok, _, code = store:append(chat, { role = "assistant", content = "after the cut" }, { worker = "w" })
      assert.is_nil(ok)
      assert.are.equal("ESTATE", code)
    end)

    -- The edit commits, the next turn runs and is published, and only then
    -- the edit's own publish, its notifications before its cache step:
    -- readers see the new turn before the truncate notification, and the
    -- reader's cache holds the reply but not the new message when its
    -- notification comes. A DB pass sees the history moved and cuts first;
    -- last_id, which skips the DB when the cache gave something, loses the
    -- new message (the race is hit).
    it("the edit's notifications come after the next turn's: every reader ends on the edited history", function()
      local store = inst:open()
      local replica = inst:open()
      local chat, ids = two_turns(store)
      local readers = readers_on(chat, { { "same store", store }, { "replica", replica } })
      settle({ store, replica }, readers)
      local edit = assert(store:edit(chat, ids.u2, { content = "edited", prepare = true }))
      local nid = edit:commit()[1]
      assert.are.same({ chat }, store:acquire({ worker = "w2" }))
      local reply = store:append(chat, { role = "assistant", content = "the reply" }, { worker = "w2" })[1]
      settle({ store, replica }, readers)
      edit:notify()
      settle({ store, replica }, readers) -- the edit's notifications, before its cache step
      edit:cache()
      local want = { ids.u1, ids.a1, nid, reply }
      assert.are.same(want, truth(inst, chat))
      for _, r in ipairs(readers) do
        r.take()
        -- last_id's cache holds the reply when the new message is notified:
        -- on the memory store the writer's (its own publish), on PostgreSQL
        -- the replica's (the reply's notification carried it; the writer's
        -- hub dropped it from its cache once every reader there had it).
        local lossy = kind == "memory" and "same store last_id" or "replica last_id"
        if r.name == lossy then
          assert.are.same({ ids.u1, ids.a1, reply }, r.view, "last_id must lose the new message")
        elseif not r.name:find("last_id", 1, true) then
          assert.are.same(want, sorted(r.view), r.name) -- unordered: any order
        end
        assert.are.same({}, r.twice, r.name)
        if r.ordered then
          -- ordered: the cut is handed over before anything after it
          assert.are.same({ ids.u1, ids.a1, ids.u2, ids.a2, "t" .. ids.a1, nid, reply }, r.kinds(), r.name)
        end
      end
    end)

    -- The seed's promote/resume race, run on a chat right after a cut: the
    -- merge's W, delivered set and the cache must be exact across it, so
    -- the race behaves as on any chat: last_id loses the promoted message,
    -- the others deliver every message once.
    for _, opts in ipairs(READERS) do
      it("the seed's promote/resume race after a cut, " .. reader_name(opts), function()
        local store = inst:open()
        local chat = store:create_chat({ owner = "alice" })
        local u1 = store:send(chat, { content = "run the tool" })
        local a1 = store:append(chat, { role = "assistant", content = "calling" })[1]
        local sub = assert(store:subscribe(chat, opts))
        local r = reader(sub)
        quiet(store)
        r.take()
        local n1 = assert(store:edit(chat, u1, { content = "run the tool, edited" }))
        local a2 = store:append(chat, { role = "assistant", content = '{"tool_call":"client_tool"}' })[1]
        quiet(store)
        r.take()
        assert.are.same({ n1, a2 }, r.view)
        assert.is_true(a1 < n1)
        local promote = store:prepare(chat, {
          { role = "tool", content = '{"result":"interrupted by a queued message"}' },
          { role = "user", content = "the queued message" },
        })
        local pids = promote:commit()
        local worker = store:prepare(chat, { role = "assistant", content = "the reply" })
        local wid = worker:commit()[1]
        promote:cache(1)
        worker:cache()
        promote:notify(1)
        quiet(store)
        r.take()
        promote:cache(2) -- the promoted user message reaches the cache last
        worker:notify()
        promote:notify(2)
        quiet(store)
        r.take()
        local want = { n1, a2, pids[1], pids[2], wid }
        assert.are.same(want, truth(inst, chat))
        local lost = {}
        for _, id in ipairs(want) do
          if not r.shown[id] then
            lost[#lost + 1] = id
          end
        end
        if opts.strategy == "last_id" then
          assert.are.same({ pids[2] }, lost, "last_id must lose the promoted message")
        else
          assert.are.same({}, lost)
          assert.are.same(want, sorted(r.view))
          assert.are.same({}, r.twice)
        end
      end)
    end
  end)
end)
