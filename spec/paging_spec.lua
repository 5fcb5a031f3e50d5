-- spec/paging_spec.lua - a DB pass reads at most a page (open{page_size}), and the
-- next page only when the reader has taken the last: a reader far behind holds a
-- page, not the backlog. Both stores; ordered delivery holds across pages.
local H = require("helpers")

local PAGE = 10

local function fill(store, chat, n)
  local ids = {}
  for i = 1, n do
    ids[i] = store:append(chat, { role = "user", content = "m" .. i })[1]
  end
  return ids
end

describe("paged catch-up", function()
  H.each_backend(_ENV, function(kind)
    local inst
    before_each(function()
      inst = H.new_instance(kind)
    end)
    after_each(function()
      inst:close()
    end)

    for _, opts in ipairs({ {}, { strategy = "watermark", ordered = false }, { strategy = "last_id" } }) do
      local name = (opts.strategy or "watermark (ordered)") .. (opts.ordered == false and ", unordered" or "")
      it(name .. ": a snapshot of 95 messages is read a page at a time, as the reader takes them", function()
        local w = inst:open()
        local chat = w:create_chat({ owner = "alice" })
        local ids = fill(w, chat, 95)
        local r = inst:open({ page_size = PAGE })
        local q0 = r:stats().queries
        local sub = assert(r:subscribe(chat, opts))
        assert.are.equal(1, r:stats().queries - q0) -- one statement: status, queue, the first page
        local got = {}
        assert.are.equal("status", sub:next(0).kind)
        for _ = 1, PAGE do
          got[#got + 1] = sub:next(0).id
        end
        assert.are.equal(1, r:stats().queries - q0) -- a whole page taken, nothing more read
        got[#got + 1] = sub:next(0).id -- the next page, read now
        assert.are.equal(2, r:stats().queries - q0)
        H.drain(sub, got)
        assert.are.same(ids, got) -- every message once, in order
        assert.is_true(r:stats().queries - q0 >= 1 + 95 // PAGE)
      end)
    end

    it("a reader that fell 95 messages behind catches up page by page, in order", function()
      local w = inst:open({ notify_bodies = false }) -- readers must query
      local chat = w:create_chat({ owner = "alice" })
      local r = inst:open({ page_size = PAGE })
      local sub = assert(r:subscribe(chat))
      assert.are.equal("status", sub:next(0).kind)
      local ids = fill(w, chat, 95)
      H.settle(r, 95)
      local q0, got = r:stats().queries, {}
      local ev = sub:next(0)
      while ev do
        got[#got + 1] = ev.id
        ev = sub:next(0)
      end
      assert.are.same(ids, got)
      local pages = r:stats().queries - q0
      assert.is_true(pages >= 95 // PAGE and pages <= 95 // PAGE + 2, "queries: " .. pages)
    end)

    it("rescan reads everything in one pass (it is never paged)", function()
      local w = inst:open()
      local chat = w:create_chat({ owner = "alice" })
      local ids = fill(w, chat, 25)
      local r = inst:open({ page_size = PAGE })
      local sub = assert(r:subscribe(chat, { strategy = "rescan" }))
      assert.are.same(ids, H.drain(sub))
    end)

    it("refuses a page_size out of range", function()
      H.contains("page_size", H.raises(inst.open, inst, { page_size = 0 }))
      H.contains("at most", H.raises(inst.open, inst, { page_size = (1 << 20) + 1 }))
    end)
  end)
end)
