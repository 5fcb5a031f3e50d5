-- spec/resume_spec.lua - the resume cursor counts only what the reader was handed.
-- sub:cursor() and every message event's ev.cursor are the watermark over the
-- messages next() has returned: a reader that stops and later subscribes with
-- after = that cursor loses nothing, and with ordered delivery (the default)
-- sees nothing twice. Events still queued inside the subscription never move it.
-- Run on both stores, for every lossless reader; last_id (its cursor is the
-- highest id handed over) must lose the late lower id of the seed's trace.
local H = require("helpers")

local readers = {
  { name = "watermark (ordered)", opts = {} },
  { name = "watermark, ordered = false", opts = { strategy = "watermark", ordered = false } },
  { name = "rescan", opts = { strategy = "rescan" } },
}

local function sub_opts(base, after)
  local o = { after = after }
  for k, v in pairs(base) do
    o[k] = v
  end
  return o
end

-- The next message event (skipping status and queue events), or nil.
local function next_msg(sub, timeout)
  return H.next_message(sub, timeout or 0)
end

-- Every message id of the chat, from a fresh replica's snapshot.
local function truth(inst, chat)
  local store = inst:open()
  local sub = assert(store:subscribe(chat))
  local ids = H.drain(sub)
  sub:close()
  store:close()
  return ids
end

local function append_n(store, chat, n, tag)
  local ids = {}
  for i = 1, n do
    ids[i] = store:append(chat, { role = "user", content = (tag or "m") .. i })[1]
  end
  return ids
end

describe("resume cursor", function()
  H.each_backend(_ENV, function(kind)
    describe("the issue's reproduction", function()
      it("cursor() counts only the messages next returned", function()
        H.with_instance(kind, function(inst)
          local s = inst:open()
          local c = s:create_chat({ owner = "alice" })
          local ids = append_n(s, c, 5)
          local sub = assert(s:subscribe(c))
          assert.are.equal("status", sub:next(0).kind)
          local ev = sub:next(0)
          assert.are.equal(ids[1], ev.id)
          local cur = sub:cursor()
          assert.are.equal(ids[1], cur) -- 2..5 are queued inside, not returned
          assert.are.equal(ids[1], ev.cursor)
          sub:close()
          local again = assert(s:subscribe(c, { after = cur }))
          assert.are.same({ ids[2], ids[3], ids[4], ids[5] }, H.drain(again))
        end)
      end)
    end)

    for _, r in ipairs(readers) do
      describe(r.name, function()
        it("resumes from each ev.cursor of the snapshot without loss", function()
          H.with_instance(kind, function(inst)
            local s = inst:open()
            local c = s:create_chat({ owner = "alice" })
            local ids = append_n(s, c, 6)
            for k = 1, #ids do
              local sub = assert(s:subscribe(c, sub_opts(r.opts, 0)))
              local got, ev = {}, nil
              for _ = 1, k do
                ev = next_msg(sub)
                got[#got + 1] = ev.id
              end
              assert.are.equal(ev.cursor, sub:cursor())
              sub:close()
              local resumed = assert(s:subscribe(c, sub_opts(r.opts, ev.cursor)))
              H.drain(resumed, got)
              local lost, dups = H.check(got, ids)
              assert.are.same({}, lost)
              assert.are.same({}, dups) -- a snapshot is a prefix: ordered anyway
            end
          end)
        end)

        it("resumes from each ev.cursor of live messages without loss", function()
          H.with_instance(kind, function(inst)
            local writer, reader = inst:open(), inst:open()
            local c = writer:create_chat({ owner = "alice" })
            local history = append_n(writer, c, 2, "h")
            local cursors = {}
            local got = {}
            local sub = assert(reader:subscribe(c, sub_opts(r.opts, 0)))
            local live = append_n(writer, c, 5, "live")
            local want = { table.unpack(history) }
            for _, id in ipairs(live) do
              want[#want + 1] = id
            end
            local deadline = os.time() + 10
            while #got < #want and os.time() <= deadline do
              local ev = next_msg(sub, 0.05)
              if ev then
                got[#got + 1] = ev.id
                cursors[#cursors + 1] = ev.cursor
                assert.are.equal(ev.cursor, sub:cursor())
              end
            end
            sub:close()
            assert.are.equal(#want, #got)
            for i, cur in ipairs(cursors) do
              local resumed = assert(reader:subscribe(c, sub_opts(r.opts, cur)))
              local part = { table.unpack(got, 1, i) }
              H.drain(resumed, part)
              local lost, dups = H.check(part, want)
              assert.are.same({}, lost, "resumed from ev.cursor " .. cur)
              assert.are.same({}, dups, "resumed from ev.cursor " .. cur)
              resumed:close()
            end
          end)
        end)
      end)
    end

    -- The seed's trace: history 3, 4; the promote commits 5 and 6, the worker
    -- 7; cache 5, 7; notify after 4; the reader takes what it gets and stops.
    -- 6 has not reached the cache: a cursor past it would lose it.
    describe("the seed's out-of-order trace", function()
      local function run(inst, opts)
        local store = inst:open()
        local filler = store:create_chat({ title = "filler" })
        store:append(filler, { { role = "user", content = "1" }, { role = "user", content = "2" } })
        local chat = store:create_chat({ owner = "alice" })
        store:append(chat, { { role = "user", content = "3" }, { role = "assistant", content = "4" } })
        local sub = assert(store:subscribe(chat, sub_opts(opts, 4)))
        local promote = store:prepare(chat, { { role = "tool", content = "5" }, { role = "user", content = "6" } })
        assert.are.same({ 5, 6 }, promote:commit())
        local worker = store:prepare(chat, { role = "assistant", content = "7" })
        assert.are.same({ 7 }, worker:commit())
        promote:cache(1)
        worker:cache()
        promote:notify(1)
        H.settle(store, 1)
        local got, cursors = {}, {}
        for ev in sub:events(0) do
          if ev.kind == "message" then
            got[#got + 1] = ev.id
            cursors[#cursors + 1] = ev.cursor
          end
        end
        local stop = sub:cursor()
        sub:close() -- the reader stops; 6 reaches the cache and is notified later
        promote:cache(2)
        worker:notify()
        promote:notify(2)
        local resumed = assert(store:subscribe(chat, sub_opts(opts, stop)))
        local before = #got
        H.drain(resumed, got)
        return got, before, stop, cursors
      end

      for _, r in ipairs(readers) do
        it(r.name .. " resumes from cursor() without loss", function()
          H.with_instance(kind, function(inst)
            local got, before, stop, cursors = run(inst, r.opts)
            assert.are.equal(stop, cursors[#cursors])
            local lost, dups = H.check(got, { 5, 6, 7 })
            assert.are.same({}, lost)
            if r.opts.strategy == nil then
              assert.are.equal(5, stop) -- 6 was never returned: the cursor waits below it
              assert.are.same({ 5, 6, 7 }, got) -- ordered: nothing twice, in order
              assert.are.equal(1, before)
            elseif r.opts.strategy == "watermark" then
              assert.are.equal(5, stop)
              assert.are.same({ 5, 7 }, { got[1], got[2] }) -- 7 came before 6
              assert.are.same({ 7 }, dups) -- handed over again after the resume
            else
              -- rescan's DB pass always runs: it found 6 after the cached 7
              assert.are.same({ 5, 7, 6 }, got)
              assert.are.same({ 5, 5, 7 }, cursors) -- 7 alone did not move it
              assert.are.equal(7, stop)
            end
          end)
        end)
      end

      it("last_id (a cursor at the highest id handed over) loses 6", function()
        H.with_instance(kind, function(inst)
          local got, _, stop = run(inst, { strategy = "last_id" })
          assert.are.equal(7, stop)
          local lost = H.check(got, { 5, 6, 7 })
          assert.are.same({ 6 }, lost)
        end)
      end)
    end)

    -- Readers stopped at random points of random stepped publishes (several
    -- writers' publishes interleaved, cache and notify steps shuffled) and
    -- resumed from cursor() or the last ev.cursor, in the same store or
    -- another one; the union of what they got is checked against the database.
    describe("randomized stop and resume", function()
      local seeds = kind == "memory" and 300 or 25
      for _, r in ipairs(readers) do
        it(r.name .. " loses nothing over " .. seeds .. " seeds", function()
          local stops, dup_total = 0, 0
          for seed = 1, seeds do
            math.randomseed(seed)
            H.with_instance(kind, function(inst)
              local stores = { inst:open({ cache_size = math.random(2, 8), page_size = math.random(1, 3) }),
                inst:open() }
              local w = stores[1]
              local chat = w:create_chat({ owner = "alice" })
              append_n(w, chat, math.random(0, 3), "h")
              local rs = stores[math.random(1, 2)]
              local cur = 0
              local sub = assert(rs:subscribe(chat, sub_opts(r.opts, cur)))
              local got, above, maydup = {}, {}, {}
              -- Steps: every publish's cache and notify steps, shuffled.
              local steps = {}
              for _ = 1, math.random(2, 6) do
                local msgs = {}
                for j = 1, math.random(1, 3) do
                  msgs[j] = { role = "user", content = "p" .. j }
                end
                local p = w:prepare(chat, msgs)
                p:commit()
                for j = 1, #msgs do
                  steps[#steps + 1] = { p = p, op = "cache", i = j }
                  steps[#steps + 1] = { p = p, op = "notify", i = j }
                end
              end
              for i = #steps, 2, -1 do
                local j = math.random(1, i)
                steps[i], steps[j] = steps[j], steps[i]
              end
              local function read_some()
                for _ = 1, math.random(0, 4) do
                  local ev = next_msg(sub, kind == "postgresql" and 0.01 or 0)
                  if not ev then
                    break
                  end
                  got[#got + 1] = ev.id
                  assert.is_true(ev.cursor >= cur)
                  cur = ev.cursor
                  if ev.id > cur then
                    above[ev.id] = true -- returned above the cursor: may come again
                  end
                end
                assert.are.equal(cur, sub:cursor())
              end
              local function stop_and_resume()
                stops = stops + 1
                sub:close()
                for id in pairs(above) do
                  if id > cur then
                    maydup[id] = true -- handed over above the cursor: may come again
                  end
                end
                above = {}
                rs = stores[math.random(1, 2)]
                sub = assert(rs:subscribe(chat, sub_opts(r.opts, cur)))
              end
              for _, st in ipairs(steps) do
                st.p[st.op](st.p, st.i)
                if math.random() < 0.5 then
                  read_some()
                end
                if math.random() < 0.3 then
                  stop_and_resume()
                end
              end
              stop_and_resume() -- the last one: its snapshot has the rest
              for ev in sub:events(0) do
                if ev.kind == "message" then
                  got[#got + 1] = ev.id
                end
              end
              local want = truth(inst, chat)
              local lost, dups = H.check(got, want)
              assert.are.same({}, lost, "seed " .. seed)
              for _, id in ipairs(dups) do
                assert.is_true(maydup[id] ~= nil, "seed " .. seed .. ": " .. id .. " twice")
              end
              if r.opts.strategy == nil then
                assert.are.same(want, got, "seed " .. seed) -- ordered: once each, ascending
              end
              dup_total = dup_total + #dups
            end)
          end
          assert.is_true(stops > seeds) -- every seed stops at least once
          if r.opts.strategy == nil then
            assert.are.equal(0, dup_total)
          end
        end)
      end
    end)
  end)
end)
