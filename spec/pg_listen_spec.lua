-- spec/pg_listen_spec.lua - LISTEN and UNLISTEN never make a call wait for
-- the listener's server (PostgreSQL only). A subscription's close hands its
-- UNLISTEN to the listener thread: with every connection stalled by a real
-- TCP proxy (build/faultproxy), the close returns at once, where it used to
-- wait for the UNLISTEN's answer up to the timeout. After a listener outage
-- the resync of many chats is two statements. A subscription opened right
-- after every connection dropped (the listener may or may not be back: the
-- spec does not control which) loses nothing: the thread reconnects,
-- LISTENs and every subscription resyncs from its own position.
local H = require("helpers")
local chatstream = require("chatstream")
local FP = require("support.faultproxy")

local function host_port(dsn)
  local host, port = dsn:match("@([%d%.]+):(%d+)/")
  return host, tonumber(port)
end

describe("the listener, from a caller's side (PostgreSQL)", function()
  if not H.require_pg(_ENV) then
    return
  end
  local proxy
  before_each(function()
    proxy = FP.start(host_port(H.dsn))
  end)
  after_each(function()
    proxy:stop()
  end)

  local function via_proxy(inst, opts)
    local o = { dsn = proxy:dsn(H.dsn), schema = inst.schema, poll_interval = 0, query_timeout = 3 }
    for k, v in pairs(opts or {}) do
      o[k] = v
    end
    local s = assert(chatstream.open(o))
    inst.stores[#inst.stores + 1] = s
    return s
  end

  it("a close does not wait for the server: its UNLISTEN goes out from the thread", function()
    H.with_instance("postgresql", function(inst)
      local r = via_proxy(inst)
      local chat = assert(r:create_chat({ owner = "alice" }))
      local sub = assert(r:subscribe(chat))
      assert.are.equal("status", sub:next(0).kind)
      proxy:stall()
      local t0 = chatstream.now()
      sub:close()
      local took = chatstream.now() - t0
      proxy:resume()
      assert.is_true(took < 1, ("the close took %.2f s (the server was stalled)"):format(took))
      -- once the proxy forwards again the thread's UNLISTEN reaches the
      -- server: the listener session follows no channel of this store
      local pid = r:listener_pid()
      local deadline = chatstream.now() + 5
      local query
      repeat
        chatstream.sleep(0.05)
        local p = io.popen(("env -u LD_PRELOAD psql -X -tA %q -c %q"):format(H.dsn,
          "SELECT query FROM pg_stat_activity WHERE pid = " .. pid))
        query = p:read("a")
        p:close()
      until query:match("^UNLISTEN") or chatstream.now() > deadline
      assert.matches('^UNLISTEN "' .. inst.schema .. ':chat:' .. chat .. '"', query)
    end)
  end)

  it("after a listener outage, the resync of many chats is two statements, not one per chat", function()
    H.with_instance("postgresql", function(inst)
      local r = via_proxy(inst)
      local w = inst:open()
      local chats, subs = {}, {}
      for c = 1, 10 do
        chats[c] = assert(w:create_chat({ owner = "alice" }))
        subs[c] = assert(r:subscribe(chats[c]))
        assert.are.equal("status", subs[c]:next(0).kind)
      end
      -- the listener hears nothing while these commit, then its connection goes
      proxy:stall()
      local want = {}
      for c = 1, 10 do
        want[c] = assert(w:append(chats[c], { role = "user", content = "during the outage" }))[1]
      end
      proxy:drop()
      proxy:resume()
      local q0 = r:stats().queries
      local got, deadline = 0, chatstream.now() + 10
      while got < 10 and chatstream.now() < deadline do
        for c = 1, 10 do
          local ev = subs[c]:next(0.02)
          if ev and ev.kind == "message" then
            assert.are.equal(want[c], ev.id)
            got = got + 1
          end
        end
      end
      assert.are.equal(10, got)
      -- the state of the 10 chats, then their messages: one statement each
      assert.are.equal(2, r:stats().queries - q0)
      assert.is_true(r:stats().shared_passes >= 10)
    end)
  end)

  it("a subscription opened right after every connection dropped loses nothing", function()
    H.with_instance("postgresql", function(inst)
      local r = via_proxy(inst)
      local w = inst:open()
      local a = assert(w:create_chat({ owner = "alice" }))
      local b = assert(w:create_chat({ owner = "alice" }))
      local sa = assert(r:subscribe(a))
      local reconnects = r:stats().reconnects
      proxy:drop() -- both connections of r go; the listener thread reconnects
      -- r's query connection reconnects inside the call; its listener
      -- may or may not be back yet: either way subscribe returns at once
      local sb, err = r:subscribe(b)
      assert.is_truthy(sb, tostring(err))
      local want = {}
      for i = 1, 20 do
        want[i] = assert(w:append(i % 2 == 0 and a or b, { role = "user", content = "m" .. i }))[1]
      end
      local got, deadline = {}, chatstream.now() + 10
      while #got < #want and chatstream.now() < deadline do
        for _, sub in ipairs({ sa, sb }) do
          local ev = sub:next(0.05)
          if ev and ev.kind == "message" then
            got[#got + 1] = ev.id
          end
        end
      end
      table.sort(got)
      assert.are.same(want, got)
      assert.is_true(r:stats().reconnects > reconnects)
    end)
  end)
end)
