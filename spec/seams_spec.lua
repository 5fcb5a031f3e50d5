-- spec/seams_spec.lua - where callers meet the store: bad text and bad cursors are
-- refused the same way by both stores, state conflicts and timeouts have codes
-- of their own.
local H = require("helpers")
local _ -- for ignored results

local bad_utf8 = {
  ["a lone continuation byte"] = "abc\x80",
  ["an overlong slash"] = "\xC0\xAF",
  ["a surrogate"] = "\xED\xA0\x80",
  ["past U+10FFFF"] = "\xF4\x90\x80\x80",
  ["a truncated sequence"] = "caf\xC3",
}

describe("seams", function()
  H.each_backend(_ENV, function(kind)
    local inst, store
    before_each(function()
      inst = H.new_instance(kind)
      store = inst:open()
    end)
    after_each(function()
      inst:close()
    end)

    describe("invalid UTF-8", function()
      for what, text in pairs(bad_utf8) do
        it("is refused as EINVAL everywhere text goes in (" .. what .. "), writing nothing", function()
          local chat = store:create_chat({ owner = "alice" })
          local r, err, code = store:append(chat, { role = "user", content = text })
          assert.is_nil(r)
          assert.are.equal("EINVAL", code)
          H.contains("not valid UTF-8", err)
          r, _, code = store:append(chat, { { role = "user", content = "fine" }, { role = "user", content = text } })
          assert.is_nil(r)
          assert.are.equal("EINVAL", code)
          r, _, code = store:send(chat, { content = text })
          assert.is_nil(r)
          assert.are.equal("EINVAL", code)
          r, _, code = store:publish_part(chat, text)
          assert.is_nil(r)
          assert.are.equal("EINVAL", code)
          r, _, code = store:create_chat({ owner = "alice", title = text })
          assert.is_nil(r)
          assert.are.equal("EINVAL", code)
          r, _, code = store:create_chat({ owner = text })
          assert.is_nil(r)
          assert.are.equal("EINVAL", code)
          local sub = assert(store:subscribe(chat))
          assert.are.same({}, H.drain(sub))
          assert.are.equal("waiting", store:chat(chat).status)
        end)
      end

      it("accepts every valid form, 1 to 4 bytes", function()
        local chat = store:create_chat({ owner = "alice", title = "caf\xC3\xA9" })
        local text = "a \xC3\xA9 \xE2\x82\xAC \xED\x9F\xBF \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF"
        local id = assert(store:append(chat, { role = "user", content = text }))[1]
        local sub = assert(store:subscribe(chat))
        local ev = H.next_message(sub, 0)
        assert.are.equal(id, ev.id)
        assert.are.equal(text, ev.content)
      end)
    end)

    describe("a cursor from the future", function()
      it("subscribe{after} beyond the chat's last message is refused with EINVAL", function()
        local chat = store:create_chat({ owner = "alice" })
        local ids = store:append(chat, { { role = "user", content = "1" }, { role = "user", content = "2" } })
        local r, err, code = store:subscribe(chat, { after = ids[2] + 1 })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        H.contains("after = " .. (ids[2] + 1) .. " is beyond the last message of chat " .. chat, err)
        local empty = store:create_chat({ owner = "alice" })
        r, _, code = store:subscribe(empty, { after = 1 })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        -- at the last message, or below it (ids of other chats): fine
        local sub = assert(store:subscribe(chat, { after = ids[2] }))
        assert.are.same({}, H.drain(sub))
        sub = assert(store:subscribe(chat, { after = ids[1] }))
        assert.are.same({ ids[2] }, H.drain(sub))
        assert(store:subscribe(empty, { after = 0 }))
      end)
    end)

    describe("codes", function()
      it("a state conflict is ESTATE, a bad argument EINVAL", function()
        local chat = store:create_chat({ owner = "alice" })
        local r, _, code = store:append(chat, { role = "assistant", content = "x" }, { worker = "w1" })
        assert.is_nil(r)
        assert.are.equal("ESTATE", code)
        r, _, code = store:finish(chat, "waiting")
        assert.is_nil(r)
        assert.are.equal("ESTATE", code)
        r, _, code = store:create_chat({ owner = string.rep("o", 256) })
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
      end)

      it("an idle timeout is nil, \"timeout\", \"ETIMEDOUT\"", function()
        local chat = store:create_chat({ owner = "alice" })
        local sub = assert(store:subscribe(chat))
        assert.are.equal("status", sub:next(0).kind)
        assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { sub:next(0.01) })
      end)
    end)
  end)
end)
