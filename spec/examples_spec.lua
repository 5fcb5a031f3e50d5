-- spec/examples_spec.lua - the examples run as the README says, as their own
-- processes: examples/agent.lua and examples/tail.lua on the embedded store,
-- and on PostgreSQL a worker process, the client commands and a tail process
-- following one chat through requires_action, a queued message, the promote
-- and the reply.
local H = require("helpers")
local P = require("support.procs")

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "../"

--- Runs an example to its end; returns its stdout (raises on failure).
local function run(script, args, env)
  local vars = {}
  for k, v in pairs(env or {}) do
    vars[#vars + 1] = k .. "=" .. P.shq(v)
  end
  local quoted = {}
  for i, a in ipairs(args or {}) do
    quoted[i] = P.shq(a)
  end
  local cmd = string.format("env -u CHATSTREAM_DSN %s LUA_PATH=%s LUA_CPATH=%s %s %s %s 2>&1",
    table.concat(vars, " "), P.shq(package.path), P.shq(package.cpath), P.LUA,
    P.shq(ROOT .. "examples/" .. script), table.concat(quoted, " "))
  local f = assert(io.popen(cmd, "r"))
  local out = f:read("a")
  local ok, _, code = f:close()
  if not ok then
    error(("%s %s failed (%s):\n%s"):format(script, table.concat(args or {}, " "), tostring(code), out), 2)
  end
  return out
end

describe("examples on the embedded store", function()
  it("demo.lua (make demo) shows last_id losing a message and the others none", function()
    local out = run("demo.lua")
    H.contains("#4 user      Actually, deploy main instead.", out)
    H.contains("The chat holds 5 messages (memory store). Per strategy:", out)
    H.contains("watermark            got 5, lost 0, twice 0", out)
    H.contains("rescan               got 5, lost 0, twice 0", out)
    H.contains("last_id              got 4, lost 1, twice 0  (missing #4)", out)
    H.contains("watermark, unordered got 5, lost 0, twice 0", out)
  end)

  it("race.lua (make race) narrates the seed's trace", function()
    local out = run("race.lua")
    H.contains("last_id   got [5, 7]  LOST 6", out)
    H.contains("rescan    got [5, 7, 6]  complete", out)
    H.contains("watermark got [5, 6, 7]  complete", out)
  end)

  it("agent.lua plays the whole lifecycle in one process", function()
    local out = run("agent.lua")
    H.contains("status waiting (version 0)", out)
    H.contains("assistant: asking the client to run client_tool [calls call-1]", out)
    H.contains("status requires_action (version 3)", out)
    H.contains('queue [#1 "never mind, just say hello"]', out)
    H.contains("tool: {\"interrupted\":true", out)
    H.contains("[answers call-1]", out)
    H.contains("assistant: reply to: never mind, just say hello", out)
    H.contains("chat 1 is waiting, queue: 0 item(s)", out)
  end)

  it("tail.lua prints a scripted chat live, parts included", function()
    local out = run("tail.lua")
    H.contains("[chat 1] message #1 user: hello", out)
    H.contains('[chat 1] part "reply "', out)
    H.contains("[chat 1] message #2 assistant: reply to: hello", out)
    H.contains("message #6 assistant: the answer is 42", out)
    H.contains("-- chat 1 is requires_action; cursor 8", out)
  end)

  it("pollbench.lua measures the backstop poll (smoke size)", function()
    local out = run("pollbench.lua", { "--shapes", "50x2", "--interval", "0.2", "--moved", "2" })
    H.contains("on the memory store", out)
    -- idle: the state read alone; 2 chats moved: and one statement for
    -- both, shared by every subscription, delivering 2 x 2 messages
    assert.is_truthy(out:find("\n50 +2 +100 +0 +1 +%d+ +[%d.]+ +[%d.]+ +[%d.]+ +0\n"), out)
    assert.is_truthy(out:find("\n50 +2 +100 +2 +2 +%d+ +[%d.]+ +[%d.]+ +[%d.]+ +4\n"), out)
  end)

  it("agent.lua work refuses the embedded store with a clear message", function()
    local ok, err = pcall(run, "agent.lua", { "work" })
    assert.is_false(ok)
    H.contains("the embedded store lives in this process only", err)
  end)
end)

describe("the event-loop examples", function()
  H.each_backend(_ENV, function(kind)
    for _, script in ipairs({ "follow.lua", "follow_luv.lua" }) do
      it(script .. " delivers every message once, in order, in one loop", function()
        H.with_instance(kind, function(inst)
          local env = kind == "postgresql" and { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema } or {}
          local out = run(script, { "--chats", "10", "--messages", "300" }, env)
          H.contains("store: " .. kind .. ", 10 chats, 300 messages", out)
          H.contains("delivered 300, duplicates 0, out of order 0", out)
        end)
      end)
    end
  end)
end)

describe("examples on PostgreSQL", function()
  if not H.require_pg(_ENV) then
    return
  end

  it("loop_bench.lua serves its subscriptions in both modes, the lock and the kill included", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      local out = run("loop_bench.lua", { "--subs", "20", "--chats", "4", "--rate", "100", "--seconds", "2" }, env)
      local rows = 0
      local row = "\n(%a+) +20 +[%d.]+ +[%d.]+ +[%d.]+ +(%d+)/(%d+) +%d+ +[%d.]+ +[%d.]+ +(%d+)"
      for mode, got, want, reconnects in out:gmatch(row) do
        rows = rows + 1
        assert.are.equal(want, got, mode .. ": every message delivered\n" .. out)
        assert.is_true(tonumber(reconnects) >= 1, mode .. ": the listener was killed\n" .. out)
      end
      assert.are.equal(2, rows, out)
    end)
  end)

  it("idle.lua measures writers with and without an idle subscriber", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      local out = run("idle.lua", { "--seconds", "1", "--chats", "2" }, env)
      local rows = 0
      local row = "with an idle subscriber +%d+ +[%d.]+%% +(%S+) +(%S+) +%S+ +(%d+)/(%d+)"
      for wait, xmin, caught, all in out:gmatch(row) do
        rows = rows + 1
        assert.are_not.equal("ClientWrite", wait, out)
        assert.are.equal("no", xmin, out)
        assert.are.equal(all, caught, out)
      end
      assert.are.equal(2, rows, out)
    end)
  end)

  it("fanout.lua delivers every message to every subscription of one store", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      local out = run("fanout.lua", { "--subs", "200", "--chats", "4", "--messages", "3" }, env)
      H.contains("fan-out: 200 subscriptions over 4 chats in one store, 3 messages per chat", out)
      assert.is_truthy(out:find(" 600/600 ", 1, true), out)
    end)
  end)

  it("web_bench.lua streams to SSE clients and to subscriptions without HTTP, every event once", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      local out = run("web_bench.lua", { "--clients", "30", "--chats", "3", "--rate", "60", "--seconds", "1" }, env)
      local rows = {}
      for mode, got, want, lost, twice in out:gmatch("\n(%a+) +30 +3 +[%d.]+ +(%d+)/(%d+) +(%d+) +(%d+)") do
        rows[#rows + 1] = mode
        assert.are.same({ "600", "0", "0" }, { want, lost, twice }, mode .. "\n" .. out)
        assert.are.equal(want, got, mode .. "\n" .. out)
      end
      assert.are.same({ "http", "direct" }, rows, out)
    end)
  end)

  it("catchup.lua measures a reader catching up, paged and in one pass", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      local out = run("catchup.lua", { "--messages", "1200", "--bytes", "100", "--pages", "100,100000" }, env)
      H.contains("catch-up: 1200 messages of 100 bytes written while the reader was idle, on PostgreSQL", out)
      local q1 = out:match("\n100 +[%d.]+ MB +[%d.]+ MB +[%d.-]+ MB +1200 +[%d.]+ +(%d+)\n")
      local q2 = out:match("\n100000 +[%d.]+ MB +[%d.]+ MB +[%d.-]+ MB +1200 +[%d.]+ +(%d+)\n")
      assert.are.equal("12", q1, out) -- 12 pages of 100
      assert.are.equal("1", q2, out)
    end)
  end)

  it("pollbench.lua measures the backstop poll (smoke size)", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      local out = run("pollbench.lua", { "--shapes", "50x2", "--interval", "0.2", "--moved", "2" }, env)
      H.contains("on PostgreSQL", out)
      assert.is_truthy(out:find("\n50 +2 +100 +0 +1 +%d+ +[%d.]+ +[%d.]+ +[%d.]+ +0\n"), out)
      assert.is_truthy(out:find("\n50 +2 +100 +2 +2 +%d+ +[%d.]+ +[%d.]+ +[%d.]+ +4\n"), out)
    end)
  end)

  it("stress.lua and bench.lua run in their smoke sizes", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      local out = run("stress.lua", { "--procs", "2", "--rounds", "3" }, env)
      H.contains("2 processes x 3 rounds = 6 rounds", out)
      for _, s in ipairs({ "rescan", "watermark", "ordered" }) do
        assert.is_truthy(out:match("\n" .. s .. " +6 +%d+ +0 %(0%.00%%%) +0 +0\n"), s .. " row:\n" .. out)
      end
      out = run("bench.lua", { "--smoke" }, env)
      for _, s in ipairs({ "watermark", "unordered", "rescan", "last_id" }) do
        assert.is_truthy(out:match("\n" .. s .. " +%d+ +%d+ +[%d.]+"), s .. " row:\n" .. out)
        H.contains(s .. " ", out:match("ceiling.*$"))
      end
      H.contains("ceiling: pgbench", out)
      H.contains("ceiling with delivery: pgbench while 2 watermark reader processes deliver", out)
      -- the watermark readers keep up and miss nothing (rescan's one query per
      -- notification can fall behind the smoke run's end on a loaded machine)
      for _, s in ipairs({ "watermark", "unordered" }) do
        local row = out:match("\n(" .. s .. " [^\n]*)")
        assert.is_nil(row:find("delivered %d+ of"), "a reader missed messages:\n" .. out)
      end
      -- the CPU table: the server is local here, so every role has figures
      for _, role in ipairs({ "writer backends", "listener backends", "writer processes", "reader processes",
        "pgbench backends", "pgbench process" }) do
        local cells = out:match("\n" .. role .. " +([%d.%- ]+)\n")
        assert.is_truthy(cells and cells:match("%d%.%d"), role .. " row:\n" .. out)
      end
      -- writer and reader in one hub: the cache proves the chain, so the
      -- watermark reader hardly queries (rescan: one query per message)
      out = run("bench.lua", { "--smoke", "--shared", "--readers", "1", "--strategies", "watermark,rescan" }, env)
      local wq = tonumber(out:match("\nwatermark +%d+ +%d+ +[%d.]+ +[%d.]+ +[%d.]+ +([%d.]+)"))
      local rq = tonumber(out:match("\nrescan +%d+ +%d+ +[%d.]+ +[%d.]+ +[%d.]+ +([%d.]+)"))
      assert(wq and rq, out)
      assert.is_true(wq < 0.5 and rq > 0.9, out)
    end)
  end)

  it("a worker process, the client commands and a tail process follow one chat", function()
    H.with_instance("postgresql", function(inst)
      local env = { CHATSTREAM_DSN = H.dsn, CHATSTREAM_SCHEMA = inst.schema }
      P.with(function(procs)
        local function start(script, args)
          local full = { ROOT .. "examples/" .. script }
          for _, a in ipairs(args) do
            full[#full + 1] = a
          end
          -- support.procs runs `lua5.4 <first> <rest...>`: the environment
          -- comes through a wrapper that sets it
          return P.spawn(procs, ROOT .. "spec/support/with_env.lua",
            { env.CHATSTREAM_DSN, env.CHATSTREAM_SCHEMA, table.unpack(full) })
        end
        local worker = start("agent.lua", { "work", "--worker", "ex-worker", "--idle", "3" })
        local chat = math.tointeger(tonumber(run("agent.lua", { "new", "/tool weather" }, env):match("%d+")))
        assert.is_truthy(chat)
        local tail = start("tail.lua", { tostring(chat), "--idle", "2" })
        local store = inst:open()
        local deadline = os.time() + 15
        while store:chat(chat).status ~= "requires_action" do
          assert(os.time() < deadline, "the worker did not answer")
          store:step(0.02)
        end
        H.contains("queued as #", run("agent.lua", { "send", tostring(chat), "never mind" }, env))
        H.contains("promoted: messages", run("agent.lua", { "promote", tostring(chat) }, env))
        assert(P.wait(tail, 20), "tail did not end")
        assert(P.wait(worker, 20), "the worker did not end")
        local tout, terr, tstatus = P.reap(tail)
        local wout, werr, wstatus = P.reap(worker)
        assert.are.equal(0, tstatus, terr)
        assert.are.equal(0, wstatus, werr)
        local t, w = table.concat(tout, "\n"), table.concat(wout, "\n")
        H.contains(("chat %d: appended 1 message(s), now requires_action"):format(chat), w)
        H.contains(("chat %d: appended 1 message(s), now waiting"):format(chat), w)
        H.contains("worker ex-worker: 2 turn(s)", w)
        H.contains('queue [#1 "never mind"]', t)
        H.contains("user: never mind", t)
        H.contains("assistant: reply to: never mind", t)
        H.contains("status waiting", t)
        H.contains("-- idle for 2 s; resume later with --after", t)
      end)
    end)
  end)
end)
