-- spec/append_many_spec.lua - store:append_many: many single-message appends,
-- each its own transaction, several in flight at once (pipeline mode on
-- PostgreSQL, in chunks of 64 per round trip), on both stores: every id in
-- order, a failing entry failing alone, readers in this store and in another
-- getting every message once.
local H = require("helpers")

H.each_backend(_ENV, function(kind)
  describe("store:append_many", function()
    it("appends each message once, in request order, readers here and elsewhere get them all", function()
      H.with_instance(kind, function(inst)
        local w, r = inst:open(), inst:open()
        local a = assert(w:create_chat({ owner = "alice" }))
        local b = assert(w:create_chat({ owner = "alice" }))
        local here, there = assert(w:subscribe(a)), assert(r:subscribe(b))
        local reqs = {}
        for i = 1, 200 do -- more than three chunks of 64
          reqs[i] = { i % 2 == 1 and a or b, { role = "user", content = "m" .. i } }
        end
        local ids, errs = w:append_many(reqs)
        assert.are.same({}, errs)
        assert.are.equal(200, #ids)
        for i = 2, 200 do
          assert.is_true(ids[i] > ids[i - 1], "ids in request order")
        end
        local want_a, want_b = {}, {}
        for i = 1, 200 do
          table.insert(i % 2 == 1 and want_a or want_b, ids[i])
        end
        assert.are.same(want_a, H.drain(here, {}, 2))
        assert.are.same(want_b, H.drain(there, {}, 2))
        -- the rows: each once, with its content
        local sub = assert(r:subscribe(a))
        local contents = {}
        for ev in sub:events(0) do
          if ev.kind == "message" then contents[#contents + 1] = ev.content end
        end
        assert.are.equal(100, #contents)
        assert.are.equal("m1", contents[1])
        assert.are.equal("m199", contents[100])
      end)
    end)

    if kind == "postgresql" then
      it("notifies a chunk after its commits, each hint carrying its message: a reader elsewhere asks nothing",
        function()
        H.with_instance(kind, function(inst)
          local w, r = inst:open(), inst:open()
          local a = assert(w:create_chat({ owner = "alice" }))
          local b = assert(w:create_chat({ owner = "alice" }))
          local sa, sb = assert(r:subscribe(a)), assert(r:subscribe(b))
          H.drain(sa)
          H.drain(sb)
          local before = r:stats()
          local reqs = {}
          for i = 1, 100 do
            reqs[i] = { i % 3 == 0 and b or a, { role = "assistant", content = "m" .. i } }
          end
          local ids, errs = w:append_many(reqs)
          assert.are.same({}, errs)
          H.settle(r, before.notifications + 100)
          local got = {}
          H.drain(sa, got)
          H.drain(sb, got)
          table.sort(got)
          assert.are.same(ids, got)
          local after = r:stats()
          assert.are.equal(100, after.bodies - before.bodies, "every hint carried its message")
          assert.are.equal(0, after.queries - before.queries, "no DB pass was needed")
        end)
      end)
    end

    it("a failing entry fails alone, with its code; the others commit", function()
      H.with_instance(kind, function(inst)
        local w = inst:open()
        local a = assert(w:create_chat({ owner = "alice" }))
        local ids, errs = w:append_many({
          { a, { role = "user", content = "one" } },
          { 987654, { role = "user", content = "no such chat" } },
          { a, { role = "user", content = "bad \xff utf-8" } },
          { a, { role = "user", content = "four" } },
        })
        assert.are.equal("integer", math.type(ids[1]))
        assert.is_false(ids[2])
        assert.are.equal("ENOTFOUND", errs[2][2])
        assert.is_false(ids[3])
        assert.are.equal("EINVAL", errs[3][2])
        assert.are.equal("integer", math.type(ids[4]))
        assert.is_nil(errs[1])
        assert.is_nil(errs[4])
        local got = H.drain(assert(w:subscribe(a)))
        assert.are.same({ ids[1], ids[4] }, got)
      end)
    end)

    it("refuses a bad batch before writing anything", function()
      H.with_instance(kind, function(inst)
        local w = inst:open()
        local a = assert(w:create_chat({ owner = "alice" }))
        assert.has_error(function() w:append_many({}) end)
        assert.has_error(function() w:append_many({ { a } }) end)
        assert.has_error(function() w:append_many({ { "x", { role = "user", content = "c" } } }) end)
        assert.has_error(function() w:append_many({ { a, { role = "robot", content = "c" } } }) end)
        assert.are.same({}, H.drain(assert(w:subscribe(a))))
      end)
    end)
  end)
end)
