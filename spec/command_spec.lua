-- spec/command_spec.lua - bin/chatstream, the command the rock installs: its
-- help, its errors, the examples it runs with their own arguments, from a
-- checkout (examples/ beside bin/) and as installed (the modules
-- chatstream.examples.NAME on package.path). scripts/check-rock runs it from
-- a real luarocks tree.
local H = require("helpers")
local P = require("support.procs")

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "../"

--- Runs `lua5.4 SCRIPT ARGS` on the memory store; returns its output (stdout
-- and stderr) and its exit code.
local function run(script, args, lua_path)
  local quoted = {}
  for i, a in ipairs(args) do
    quoted[i] = P.shq(a)
  end
  local cmd = string.format("env -u CHATSTREAM_DSN LUA_PATH=%s LUA_CPATH=%s %s %s %s 2>&1",
    P.shq(lua_path or package.path), P.shq(package.cpath), P.LUA, P.shq(script), table.concat(quoted, " "))
  local f = assert(io.popen(cmd, "r"))
  local out = f:read("a")
  local _, _, code = f:close()
  return out, code
end

local BIN = ROOT .. "bin/chatstream"
local COMMANDS = { "demo", "race", "tail", "agent", "web" }

describe("the chatstream command", function()
  it("--help lists every command and exits 0", function()
    local out, code = run(BIN, { "--help" })
    assert.are.equal(0, code, out)
    H.contains("usage: chatstream COMMAND [ARGS...]", out)
    for _, c in ipairs(COMMANDS) do
      assert.is_truthy(out:find("\n  " .. c .. " ", 1, true), c .. " missing:\n" .. out)
    end
  end)

  it("an unknown command is an error naming it, exit 2", function()
    local out, code = run(BIN, { "dmeo" })
    assert.are.equal(2, code, out)
    H.contains('chatstream: unknown command "dmeo" (chatstream --help lists them)', out)
  end)

  it("no command prints the usage and exits 2", function()
    local out, code = run(BIN, {})
    assert.are.equal(2, code, out)
    H.contains("usage: chatstream COMMAND", out)
  end)

  it("--version is the module's", function()
    local out, code = run(BIN, { "--version" })
    assert.are.equal(0, code, out)
    assert.are.equal("chatstream " .. require("chatstream")._VERSION .. "\n", out)
  end)

  it("demo runs examples/demo.lua from a checkout", function()
    local out, code = run(BIN, { "demo" })
    assert.are.equal(0, code, out)
    H.contains("last_id              got 4, lost 1, twice 0  (missing #4)", out)
    H.contains("watermark            got 5, lost 0, twice 0", out)
  end)

  it("hands the example its own arguments", function()
    local out, code = run(BIN, { "tail", "--no-such-flag" })
    assert.are.equal(2, code, out)
    H.contains("usage: tail.lua [CHAT]", out)
    out, code = run(BIN, { "agent", "demo" })
    assert.are.equal(0, code, out)
    H.contains("chat 1 is waiting, queue: 0 item(s)", out)
    -- web: lua-http found (on Debian's 5.3 paths), then web.lua's own usage
    out, code = run(BIN, { "web", "--port" })
    assert.are.equal(2, code, out)
    H.contains("usage: web.lua [--port N]", out)
  end)

  describe("installed (no examples/ beside it)", function()
    local dir
    before_each(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute(("mkdir -p %s/bin %s/lua/chatstream/examples && cp %s %s/bin/"):format(
        P.shq(dir), P.shq(dir), P.shq(BIN), P.shq(dir))))
    end)
    after_each(function()
      os.execute("rm -rf " .. P.shq(dir))
    end)

    it("runs the example module chatstream.examples.NAME found on package.path", function()
      assert(os.execute(("cp %s %s/lua/chatstream/examples/race.lua"):format(
        P.shq(ROOT .. "examples/race.lua"), P.shq(dir))))
      local out, code = run(dir .. "/bin/chatstream", { "race" }, dir .. "/lua/?.lua;" .. package.path)
      assert.are.equal(0, code, out)
      H.contains("last_id   got [5, 7]  LOST 6", out)
    end)

    it("says which module is missing when the example is not installed", function()
      local out, code = run(dir .. "/bin/chatstream", { "race" }, dir .. "/lua/?.lua;" .. package.path)
      assert.are.equal(2, code, out)
      H.contains('chatstream: the example "race" is not installed (package.path has no chatstream.examples.race)', out)
    end)
  end)
end)
