-- spec/stream_spec.lua - store:stream (a subscription as a for loop's closing
-- value) and the hub options max_chats and query_timeout.
local chatstream = require("chatstream")
local H = require("helpers")

local function msg(content)
  return { role = "user", content = content }
end

describe("store:stream", function()
  H.each_backend(_ENV, function(kind)
    it("iterates the snapshot and live messages, then closes the subscription", function()
      H.with_instance(kind, function(inst)
        local store = inst:open()
        local chat = store:create_chat({ owner = "alice" })
        local ids = store:append(chat, { msg("a"), msg("b") })
        local f, s, c, closing = store:stream(chat, { strategy = "watermark" }, 0.2)
        assert.are.equal("chatstream.Subscription", getmetatable(closing).__name)
        local evs, got = {}, {}
        for ev in f, s, c, closing do
          evs[#evs + 1] = ev
          if ev.kind == "message" then
            got[#got + 1] = ev.id
            if #got == 2 then
              ids[3] = store:append(chat, msg("c"))[1] -- live, while iterating
            end
          end
        end
        -- the chat's status, then the 2 messages of the snapshot and the live one
        assert.are.same(H.status_event(chat), evs[1])
        assert.are.equal(4, #evs)
        assert.are.same(ids, got)
        assert.truthy(tostring(closing):find("(closed)", 1, true))
      end)
    end)

    it("closes the subscription when the loop body breaks or raises", function()
      H.with_instance(kind, function(inst)
        local store = inst:open()
        local chat = store:create_chat({ owner = "alice" })
        store:append(chat, { msg("a"), msg("b") })
        local f, s, c, closing = store:stream(chat)
        for _ in f, s, c, closing do -- luacheck: ignore 512 (the break is the point)
          break
        end
        assert.truthy(tostring(closing):find("(closed)", 1, true))
        local f2, s2, c2, closing2 = store:stream(chat)
        local ok, err = pcall(function()
          for _ in f2, s2, c2, closing2 do
            error("boom")
          end
        end)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("boom", 1, true))
        assert.truthy(tostring(closing2):find("(closed)", 1, true))
      end)
    end)

    it("raises when the subscription cannot be opened", function()
      H.with_instance(kind, function(inst)
        local store = inst:open()
        local ok, err = pcall(store.stream, store, 424242)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("ENOTFOUND", 1, true))
      end)
    end)
  end)
end)

describe("the max_chats option", function()
  H.each_backend(_ENV, function(kind)
    it("bounds the chat caches a store keeps and loses nothing to it", function()
      H.with_instance(kind, function(inst)
        local store = inst:open({ max_chats = 3 })
        local watched = store:create_chat({ owner = "alice" })
        local sub = assert(store:subscribe(watched))
        assert.are.same(H.status_event(watched), sub:next(0))
        for i = 1, 10 do
          local c = store:create_chat({ owner = "bob" })
          store:append(c, msg("x" .. i))
        end
        assert.are.equal(3, store:stats().cached_chats)
        local id = store:append(watched, msg("hello"))[1]
        local ev = assert(sub:next(5))
        assert.are.equal(id, ev.id)
        sub:close()
      end)
    end)
  end)

  it("must be an integer >= 1", function()
    for _, bad in ipairs({ 0, -1, 1.5, "3" }) do
      local ok, err = pcall(chatstream.open, { max_chats = bad })
      assert.is_false(ok)
      assert.truthy(err:find("max_chats", 1, true))
    end
  end)
end)

describe("the query_timeout option", function()
  it("must be a number > 0", function()
    for _, bad in ipairs({ 0, -1, "5" }) do
      local ok, err = pcall(chatstream.open, { query_timeout = bad })
      assert.is_false(ok)
      assert.truthy(err:find("query_timeout", 1, true))
    end
  end)
end)

describe("the notify_bodies option", function()
  it("must be a boolean", function()
    for _, bad in ipairs({ 0, 1, "false", {} }) do
      local ok, err = pcall(chatstream.open, { notify_bodies = bad })
      assert.is_false(ok)
      assert.truthy(err:find("option 'notify_bodies' must be a boolean", 1, true), err)
    end
    -- accepted on the memory store too (where notifications never carry it)
    local store = chatstream.open({ notify_bodies = false })
    local chat = assert(store:create_chat())
    assert(store:append(chat, { role = "user", content = "x" }))
    store:close()
  end)
end)

describe("a subscription closed from Lua code run inside its own next", function()
  -- A finalizer run by an allocation inside next can close the subscription
  -- whose event is being built. A call hook reaches the same point every
  -- time: it fires when next calls its (C) event builder.
  H.each_backend(_ENV, function(kind)
    it("hands over the event whole and is closed once next returns", function()
      H.with_instance(kind, function(inst)
        local store = inst:open()
        local chat = store:create_chat({ owner = "alice" })
        store:append(chat, { role = "user", content = ("payload-"):rep(1000) })
        -- Another replica: its events come from the DB, owned by the
        -- subscription alone (a use-after-free would show under ASan).
        local sub = assert(inst:open():subscribe(chat))
        -- The snapshot's status first (its text is static): the hook is for
        -- the message event after it.
        assert.are.same(H.status_event(chat), sub:next(0))
        local closed = false
        debug.sethook(function()
          local caller = debug.getinfo(3, "n")
          if not closed and caller and caller.name == "next" then
            closed = true
            sub:close()
          end
        end, "c")
        local ok, ev = pcall(function()
          return sub:next(1) -- a method call: the hook sees it named "next"
        end)
        debug.sethook()
        assert(ok, ev)
        assert.is_true(closed, "the hook never ran inside next: the spec missed its path")
        assert.are.equal(("payload-"):rep(1000), ev.content)
        assert.truthy(tostring(sub):find("(closed)", 1, true))
        assert.has_error(function()
          sub:next(0)
        end, "attempt to use a closed subscription")
      end)
    end)
  end)
end)
