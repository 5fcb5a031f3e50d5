-- spec/loop_spec.lua - chatstream inside real event loops: cqueues and luv,
-- on both stores. Followers serve store:ready() while writers append through
-- the same store; every follower gets every message once and in order. On
-- PostgreSQL an append waiting on a row lock another session holds, and a
-- killed listener, do not stop the loop: a 10 ms ticker keeps firing (the
-- same append through the plain, blocking store stops it: the control), and
-- the store's pollfd is the same descriptor before and after.
local H = require("helpers")
local chatstream = require("chatstream")
local cqueues = require("cqueues")
local uv = require("luv")

local function luv_sleep(s)
  local co = coroutine.running()
  local t = uv.new_timer()
  uv.update_time() -- libuv's clock is cached: it may be stale outside the loop
  t:start(math.max(0, math.ceil(s * 1000)), 0, function()
    t:close()
    local ok, err = coroutine.resume(co)
    if not ok then
      error(err, 0)
    end
  end)
  coroutine.yield()
end

-- Each loop: its adapter, how to run coroutines in it to the end (errors
-- raised), and a sleep that yields to it.
local loops = {
  {
    name = "cqueues",
    mod = require("chatstream.cqueues"),
    sleep = cqueues.sleep,
    run = function(fns)
      local cq = cqueues.new()
      for _, f in ipairs(fns) do
        cq:wrap(f)
      end
      assert(cq:loop())
    end,
  },
  {
    name = "luv",
    mod = require("chatstream.luv"),
    sleep = luv_sleep,
    run = function(fns)
      local errs = {}
      for _, f in ipairs(fns) do
        coroutine.wrap(function()
          local ok, err = xpcall(f, debug.traceback)
          if not ok then
            errs[#errs + 1] = err
          end
        end)()
      end
      uv.run()
      assert(#errs == 0, table.concat(errs, "\n"))
    end,
  },
}

-- A store on inst opened through the adapter (the instance closes it).
local function open_on(inst, mod, opts)
  local o = {}
  for k, v in pairs(opts or {}) do
    o[k] = v
  end
  if inst.kind == "memory" then
    o.memory = inst.memdb
  else
    o.dsn, o.schema = H.dsn, inst.schema
    if o.poll_interval == nil then
      o.poll_interval = 0
    end
  end
  local store = assert(mod.open(o))
  inst.stores[#inst.stores + 1] = store
  return store
end

-- A ticker: counts 10 ms ticks while running() is true.
local function ticker(sleep, state)
  return function()
    while not state.done do
      sleep(0.01)
      state.ticks = state.ticks + 1
    end
  end
end

local function follow(L, inst, nchats, nsubs, nmsgs)
  local store = open_on(inst, L.mod)
  local chats, subs, got = {}, {}, {}
  local want, state = {}, { done = false, ticks = 0 }
  local fd0 = store:pollfd()
  L.run({
    function() -- the follower
      for c = 1, nchats do
        chats[c] = assert(store:create_chat({ owner = "loop" }))
        for _ = 1, nsubs do
          local sub = assert(store:subscribe(chats[c]))
          subs[#subs + 1] = sub
          got[sub] = { chat = chats[c] }
        end
      end
      local total = 0
      while total < nmsgs * nsubs do
        for _, sub in ipairs(store:ready()) do
          while true do
            local ev = sub:next(0)
            if not ev then
              break
            end
            if ev.kind == "message" then
              local g = got[sub]
              g[#g + 1] = ev.id
              total = total + 1
            end
          end
        end
        if total < nmsgs * nsubs then
          L.mod.wait(store, 5)
          store:step()
        end
      end
      state.done = true
    end,
    function() -- the writer
      while not chats[nchats] do
        L.sleep(0.005)
      end
      for i = 1, nmsgs do
        local c = chats[(i - 1) % nchats + 1]
        local id = assert(store:append(c, { role = "user", content = "m" .. i }))[1]
        want[c] = want[c] or {}
        table.insert(want[c], id)
      end
    end,
    ticker(L.sleep, state),
  })
  for _, sub in ipairs(subs) do
    local g = got[sub]
    assert.are.same(want[g.chat] or {}, { table.unpack(g) }, "every message once, in order")
  end
  assert.are.equal(fd0, store:pollfd())
  return store
end

for _, L in ipairs(loops) do
  describe("in a " .. L.name .. " loop", function()
    H.each_backend(_ENV, function(kind)
      it("a follower gets every message once, in order, from a writer in the same loop", function()
        H.with_instance(kind, function(inst)
          follow(L, inst, 5, 2, 200)
        end)
      end)

      it("sub:next(timeout) yields until a message comes", function()
        H.with_instance(kind, function(inst)
          local store = open_on(inst, L.mod)
          local chat = assert(store:create_chat({ owner = "loop" }))
          local sub = assert(store:subscribe(chat))
          assert.are.equal("status", sub:next(0).kind)
          local state, got, id = { done = false, ticks = 0 }, nil, nil
          L.run({
            function()
              got = H.next_message(sub, 5)
              state.done = true
            end,
            function()
              L.sleep(0.2)
              id = assert(store:append(chat, { role = "user", content = "late" }))[1]
            end,
            ticker(L.sleep, state),
          })
          assert.is_truthy(got)
          assert.are.equal(id, got.id)
          assert.is_true(state.ticks >= 5, "the loop ran while next waited: " .. state.ticks .. " ticks")
          assert.is_nil(sub:next(0)) -- nothing twice
        end)
      end)

      it("outside a coroutine its calls block as the plain store's do", function()
        H.with_instance(kind, function(inst)
          local store = open_on(inst, L.mod)
          local chat = assert(store:create_chat({ owner = "loop" }))
          local sub = assert(store:subscribe(chat))
          local id = assert(store:append(chat, { role = "user", content = "hi" }))[1]
          assert.are.equal(id, H.next_message(sub, 5).id)
          local ev, err, code = sub:next(0.05)
          assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { ev, err, code })
        end)
      end)
    end)

    describe("on postgresql", function()
      if not H.require_pg(_ENV) then
        return
      end

      -- Holds the chat's row lock from another session for `secs`; returns
      -- once the holder sleeps with the lock.
      local function hold_lock(inst, chat, secs)
        local sql = ("BEGIN; SELECT 1 FROM %s.chats WHERE id = %d FOR UPDATE; SELECT pg_sleep(%s); COMMIT;")
          :format(inst.schema, chat, secs)
        local h = io.popen(("env -u LD_PRELOAD psql -X -q %q -c %q >/dev/null 2>&1"):format(H.dsn, sql))
        local deadline = chatstream.now() + 10
        while chatstream.now() < deadline do
          local p = io.popen(("env -u LD_PRELOAD psql -X -tA %q -c %q"):format(H.dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"))
          local n = tonumber(p:read("a"))
          p:close()
          if n and n > 0 then
            return h
          end
          chatstream.sleep(0.02)
        end
        error("the lock holder did not start")
      end

      -- One append while another session holds the row lock 1 s: returns
      -- the ticks a 10 ms ticker got meanwhile and the append's duration.
      local function append_under_lock(inst, store, chat)
        local h = hold_lock(inst, chat, 1)
        local state, took, id = { done = false, ticks = 0 }, nil, nil
        L.run({
          function()
            local t0 = chatstream.now()
            id = assert(store:append(chat, { role = "user", content = "after the lock" }))[1]
            took = chatstream.now() - t0
            state.done = true
          end,
          ticker(L.sleep, state),
        })
        h:close()
        assert.is_truthy(id)
        return state.ticks, took
      end

      it("an append waiting on a row lock yields to the loop (the plain store blocks it)", function()
        H.with_instance("postgresql", function(inst)
          local store = open_on(inst, L.mod)
          local chat = assert(store:create_chat({ owner = "loop" }))
          local ticks, took = append_under_lock(inst, store, chat)
          assert.is_true(took > 0.5, "the append waited for the lock: " .. took)
          assert.is_true(ticks >= 20, "the ticker fired while the append waited: " .. ticks .. " ticks")
          -- the control: the same through the plain store, which blocks
          local plain = inst:open()
          local pticks, ptook = append_under_lock(inst, plain, chat)
          assert.is_true(ptook > 0.5)
          assert.is_true(pticks <= 2, "the plain store blocked the loop: " .. pticks .. " ticks")
        end)
      end)

      it("an open inside the loop yields while it connects (the plain open blocks it)", function()
        H.with_instance("postgresql", function(inst)
          local FP = require("support.faultproxy")
          local host, port = H.dsn:match("@([%d%.]+):(%d+)/")
          local proxy = FP.start(host, tonumber(port))
          local ok, err = pcall(function()
            -- through the adapter: the start-up waits on the stalled proxy
            -- until another coroutine resumes it, the ticker running
            proxy:stall()
            local state, store = { done = false, ticks = 0 }, nil
            L.run({
              function()
                store = assert(L.mod.open({ dsn = proxy:dsn(H.dsn), schema = inst.schema, poll_interval = 0 }))
                state.done = true
              end,
              function()
                L.sleep(0.5)
                proxy:resume()
              end,
              ticker(L.sleep, state),
            })
            assert.is_truthy(store)
            assert.is_true(assert(store:create_chat({ owner = "loop" })) > 0)
            store:close()
            assert.is_true(state.ticks >= 20, "the loop ran while open connected: " .. state.ticks)
            -- the control: the plain open blocks the loop (nobody can resume
            -- the proxy), until its connect_timeout
            proxy:stall()
            state = { done = false, ticks = 0 }
            local plain, perr
            L.run({
              function()
                plain, perr = chatstream.open({ dsn = proxy:dsn(H.dsn) .. "?connect_timeout=2", schema = inst.schema })
                state.done = true
              end,
              ticker(L.sleep, state),
            })
            proxy:resume()
            assert.is_nil(plain)
            assert.is_truthy(perr)
            assert.is_true(state.ticks <= 2, "the plain open blocked the loop: " .. state.ticks)
          end)
          proxy:stop()
          assert(ok, err)
        end)
      end)

      it("a second call waits its turn behind one that waits on the server", function()
        H.with_instance("postgresql", function(inst)
          local store = open_on(inst, L.mod)
          local chat = assert(store:create_chat({ owner = "loop" }))
          local other = assert(store:create_chat({ owner = "loop" }))
          local h = hold_lock(inst, chat, 0.5)
          local order, refused = {}, nil
          L.run({
            function()
              assert(store:append(chat, { role = "user", content = "locked" }))
              order[#order + 1] = "locked"
            end,
            function()
              L.sleep(0.05)
              -- a raw job while the first call waits: refused
              refused = select(2, pcall(store.job, store, function() end))
              assert(store:append(other, { role = "user", content = "free" }))
              order[#order + 1] = "free"
            end,
          })
          h:close()
          assert.are.same({ "locked", "free" }, order)
          assert.matches("a call is under way", refused)
        end)
      end)

      it("a killed listener: followers still get every message once, in order; the pollfd stays", function()
        H.with_instance("postgresql", function(inst)
          local store = open_on(inst, L.mod)
          local fd0 = store:pollfd()
          local chats, subs, got, want = {}, {}, {}, {}
          local pid0 = store:listener_pid()
          local state = { done = false, ticks = 0 }
          L.run({
            function()
              for c = 1, 4 do
                chats[c] = assert(store:create_chat({ owner = "loop" }))
                subs[c] = assert(store:subscribe(chats[c]))
                got[c] = {}
              end
              local total = 0
              while total < 300 do
                for _, sub in ipairs(store:ready()) do
                  while true do
                    local ev = sub:next(0)
                    if not ev then break end
                    if ev.kind == "message" then
                      for c = 1, 4 do
                        if subs[c] == sub then table.insert(got[c], ev.id) end
                      end
                      total = total + 1
                    end
                  end
                end
                if total < 300 then
                  L.mod.wait(store, 5)
                  store:step()
                end
              end
              state.done = true
            end,
            function()
              while not subs[4] do L.sleep(0.005) end
              for i = 1, 300 do
                if i == 150 then
                  H.psql(("SELECT pg_terminate_backend(%d)"):format(pid0))
                end
                local c = (i - 1) % 4 + 1
                want[c] = want[c] or {}
                table.insert(want[c], assert(store:append(chats[c], { role = "user", content = "m" .. i }))[1])
              end
            end,
            ticker(L.sleep, state),
          })
          for c = 1, 4 do
            assert.are.same(want[c], got[c])
          end
          assert.are.equal(fd0, store:pollfd())
          assert.is_true(store:stats().reconnects >= 1)
          assert.are_not.equal(pid0, store:listener_pid())
        end)
      end)
    end)
  end)
end

describe("the store as a cqueues pollable", function()
  H.each_backend(_ENV, function(kind)
    it("cqueues.poll(store) wakes when another store writes, and not before", function()
      H.with_instance(kind, function(inst)
        local cs = require("chatstream.cqueues")
        local reader = open_on(inst, cs)
        local writer = inst:open()
        local chat = assert(writer:create_chat({ owner = "loop" }))
        local sub = assert(reader:subscribe(chat))
        assert.are.equal(1, #reader:ready()) -- the snapshot's status
        assert.are.equal("status", sub:next(0).kind)
        assert.are.equal(0, #reader:ready()) -- its last event: off the list
        assert.is_nil(sub:next(0))
        assert.are.equal("r", reader:events())
        local woke, id, t_write
        local cq = cqueues.new()
        cq:wrap(function()
          local t0 = cqueues.monotime()
          cqueues.poll(reader, 5)
          woke = cqueues.monotime() - t0
          reader:step()
        end)
        cq:wrap(function()
          cqueues.sleep(0.2)
          t_write = cqueues.monotime()
          id = assert(writer:append(chat, { role = "user", content = "wake" }))[1]
        end)
        assert(cq:loop())
        assert.is_true(woke >= 0.15, "it waited for the write: " .. woke)
        assert.is_true(woke < 4, "it woke on the write: " .. woke)
        assert.is_truthy(t_write)
        local ready = reader:ready()
        assert.are.equal(1, #ready)
        assert.are.equal(sub, ready[1])
        assert.are.equal(id, sub:next(0).id)
        assert.are.equal(0, #reader:ready())
        assert.is_nil(sub:next(0))
      end)
    end)
  end)
end)
