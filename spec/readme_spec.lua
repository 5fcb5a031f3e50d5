-- spec/readme_spec.lua - the README's commands work as written. Every
-- ```sh/```shell command and every ```lua block of README.md is classified
-- below, by a stable key, and then run:
--   run      as written, from the clone's root (shell: sh -c; Lua: a
--            program against the build, after a prelude that only binds
--            the names the block leaves to the reader)
--   server   the same against the test server (CHATSTREAM_TEST_DSN, a fresh
--            schema): a failure in CI without one, pending elsewhere
--   skip     long-running or interactive, with the reason (and what runs it)
-- A block or command that is not listed fails the spec, and so does a listed
-- key that the README no longer has: the README cannot rot quietly.
--
-- Keys: a shell command is its text, trailing comment and surrounding blanks
-- stripped ("make demo"); a Lua block is its first line. To classify a new
-- one, add its key to SH or LUA. Untagged blocks (```) are prose.
local H = require("helpers")

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "../"

-- export lines (env = true) hold for the later commands of their block.
local SH = {
  -- Install: the release rock into a tree of one's own, and its command
  ["make dist VERSION=0.1.0"] = { skip = "writes dist/; scripts/check-rock (make test-rock) makes a release rock" },
  ['luarocks --lua-version=5.4 --tree="$HOME/.chatstream" install dist/chatstream-0.1.0-1.src.rock'] = {
    skip = "installs into $HOME; scripts/check-rock installs the rock it made into a fresh tree" },
  ['export PATH="$HOME/.chatstream/bin:$PATH"'] = { skip = "the tree of the install above" },
  ["chatstream demo"] = { skip = "the installed command; scripts/check-rock runs it from the fresh tree, "
    .. "outside the clone" },
  -- Set up and run
  ["make demo"] = { run = true, expect = "last_id" },
  ['export LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;" LUA_CPATH="$PWD/build/?.so;;"'] = { env = true },
  ["make test"] = { skip = "every suite (this spec among them): tens of minutes, and recursive; .ci/run runs it" },
  -- Chat lifecycle: the examples, embedded store, then PostgreSQL
  ['export LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/?.so;;"'] = { env = true },
  ["lua5.4 examples/agent.lua"] = { run = true, expect = "requires_action" },
  ["lua5.4 examples/tail.lua"] = { run = true, expect = "status" },
  ["export CHATSTREAM_DSN=postgresql://user@127.0.0.1:5432/db"] = { server = true, env = true, dsn = true },
  -- "three terminals": the worker and the tail run in the background
  -- until the block's last command has run
  ["lua5.4 examples/agent.lua work --idle 60"] = { server = true, background = true },
  ['lua5.4 examples/agent.lua new "/tool weather"'] = { server = true, expect = "1" },
  ["lua5.4 examples/tail.lua 1"] = { server = true, background = true },
  -- the worker has answered the /tool message first (the README's order)
  ['lua5.4 examples/agent.lua send 1 "never mind"'] = { server = true, after_status = "requires_action",
    expect = "queued" },
  ["lua5.4 examples/agent.lua promote 1"] = { server = true, expect = "promoted" },
  -- Web
  ["make web"] = { skip = "serves until killed; spec/web_spec.lua runs the server, web_browser_spec.lua a browser" },
  ["chromium http://127.0.0.1:8080/"] = { skip = "an interactive browser; spec/web_browser_spec.lua drives one" },
}

local LUA = {
  -- PostgreSQL: the DSNs and the schema are the README's placeholders
  ['local store = assert(chatstream.open("postgresql://user:pw@127.0.0.1/app"))  -- a URI or a conninfo string'] = {
    server = true,
    prelude = 'local chatstream = require("chatstream")',
    subst = {
      { '"postgresql://user:pw@127.0.0.1/app"', "DSN" },
      { '"host=127.0.0.1 dbname=app"', "DSN" },
      { 'schema = "chatstream"', "SCHEMA" },
    },
  },
  -- Lua API: `msgs` (messages) and `other` (another chat, here one that does
  -- not exist: its entry fails, as the block says one may) are the reader's
  ['local chatstream = require("chatstream")'] = {
    run = true,
    prelude = 'local msgs = {role = "user", content = "m"}; local other = 99',
  },
  -- Lifecycle calls: on a chat of alice's; queued_id names no item here (the
  -- calls that need one return ENOTFOUND: failures are returned, not raised)
  ['local id, queued = store:send(chat, {content = "hi", actor = "alice", idempotency_key = "k"})'] = {
    run = true,
    prelude = 'local chatstream = require("chatstream"); local store = chatstream.open(); '
      .. 'local chat = store:create_chat{owner = "alice"}; local queued_id = 1; '
      .. 'local msgs = {role = "assistant", content = "partial"}; '
      .. 'local ev = {kind = "part", chat_id = chat, text = "delta", after = 0}',
  },
  -- Event loops
  ['local cqueues = require("cqueues")'] = {
    skip = "a follower that loops forever, over the reader's chats and send_to_client; examples/follow.lua "
      .. "is its runnable form (spec/examples_spec.lua runs it)",
  },
  -- Web, in a program of one's own
  ['local cs = require("chatstream.cqueues")'] = {
    skip = "srv:loop() serves until killed; spec/web_spec.lua runs web.listen and srv:loop",
  },
}

-- ---- reading the README -----------------------------------------------------

--- Strips a shell comment (a # after a blank, outside quotes) and the blanks.
local function strip_comment(line)
  local quote
  for i = 1, #line do
    local c = line:sub(i, i)
    if quote then
      if c == quote then
        quote = nil
      end
    elseif c == '"' or c == "'" then
      quote = c
    elseif c == "#" and (i == 1 or line:sub(i - 1, i - 1):match("%s")) then
      line = line:sub(1, i - 1)
      break
    end
  end
  return (line:gsub("^%s+", ""):gsub("%s+$", ""))
end

--- The fenced blocks: {lang, lines, line} in order.
local function blocks()
  local list, cur = {}, nil
  local n = 0
  for line in io.lines(ROOT .. "README.md") do
    n = n + 1
    local fence = line:match("^```(.*)$")
    if fence and not cur then
      cur = { lang = fence:match("^%s*(%S*)"), lines = {}, line = n }
    elseif fence then
      list[#list + 1] = cur
      cur = nil
    elseif cur then
      cur.lines[#cur.lines + 1] = line
    end
  end
  assert(not cur, "README.md: a fenced block opened at line " .. (cur and cur.line or 0) .. " never closes")
  return list
end

local SHELL = { sh = true, shell = true, bash = true, console = true }

--- The shell commands of a block (continuation lines joined).
local function commands(b)
  local cmds, acc = {}, nil
  for _, line in ipairs(b.lines) do
    local cont = line:match("^(.*)\\%s*$")
    local text = acc and (acc .. " " .. (cont or line)) or (cont or line)
    if cont then
      acc = text
    else
      acc = nil
      local cmd = strip_comment(text)
      if cmd ~= "" then
        cmds[#cmds + 1] = cmd:gsub("%s+", " ")
      end
    end
  end
  return cmds
end

local function first_line(b)
  for _, l in ipairs(b.lines) do
    if l:match("%S") then
      return (l:gsub("%s+$", ""))
    end
  end
  return ""
end

-- ---- running ---------------------------------------------------------------

local function shq(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local SCHEMA = ("readme_%d_%d"):format(os.time() % 100000, math.random(1, 1e6))

--- Runs a shell command line from the root, as a newcomer's shell would:
-- none of the test run's environment but what the block exported (no ASan
-- preload, no CHATSTREAM_DSN). Returns ok, output.
local function sh(exports, cmd, limit)
  local line = ("cd %s && env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS -u CHATSTREAM_DSN "
    .. "-u LUA_PATH -u LUA_CPATH timeout %d sh -c %s 2>&1"):format(
    shq(ROOT), limit or 300, shq(table.concat(exports, "; ") .. (#exports > 0 and "; " or "") .. cmd))
  local f = assert(io.popen(line, "r"))
  local out = f:read("a")
  return f:close(), out
end

--- Runs a Lua block as a program against the build (this run's module
-- paths, and its environment: an ASan build needs its preload).
local function run_lua(code)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  local p = assert(io.popen(("cd %s && LUA_PATH=%s LUA_CPATH=%s lua5.4 %s 2>&1"):format(
    shq(ROOT), shq(package.path), shq(package.cpath), shq(path)), "r"))
  local out = p:read("a")
  local ok = p:close()
  os.remove(path)
  return ok, out
end

--- The Lua program of a block: its prelude, then the block with its
-- placeholders replaced.
local function lua_program(b, c)
  local text = table.concat(b.lines, "\n")
  for _, s in ipairs(c.subst or {}) do
    local to = s[2] == "DSN" and ("%q"):format(H.dsn) or ('schema = "%s"'):format(SCHEMA)
    local i, j = text:find(s[1], 1, true)
    assert(i, "README block at line " .. b.line .. " no longer has " .. s[1])
    text = text:sub(1, i - 1) .. to .. text:sub(j + 1)
  end
  return (c.prelude or "") .. "\n" .. text .. "\n"
end

--- Waits until chat 1 of the README's schema has status st (a store of its own).
local function wait_status(st)
  local chatstream = require("chatstream")
  local store <close> = assert(chatstream.open({ dsn = H.dsn, schema = SCHEMA }))
  local deadline = os.time() + 20
  while true do
    local c = store:chat(1)
    if c and c.status == st then
      return
    end
    assert(os.time() < deadline, "chat 1 never reached " .. st .. " (last: " .. tostring(c and c.status) .. ")")
    chatstream.sleep(0.05)
  end
end

--- Runs a block's server commands in order (after the block's other
-- exports), the background ones started (and stopped at the end) as their
-- own processes.
local function run_server_sequence(cmds, exports)
  local bg = {}
  local ok, err = pcall(function()
    for _, cmd in ipairs(cmds) do
      local c = SH[cmd]
      if c.env then
        local e = cmd
        if c.dsn then
          e = ("export CHATSTREAM_DSN=%s CHATSTREAM_SCHEMA=%s"):format(shq(H.dsn), SCHEMA)
        end
        exports[#exports + 1] = e
      elseif c.background then
        local log = os.tmpname()
        local okb, out = sh(exports, ("(exec %s) >%s 2>&1 & echo $!"):format(cmd, shq(log)), 10)
        assert(okb, out)
        bg[#bg + 1] = { pid = assert(math.tointeger(tonumber(out:match("%d+")))), log = log, cmd = cmd }
      else
        if c.after_status then
          wait_status(c.after_status)
        end
        local okc, out = sh(exports, cmd, 60)
        assert(okc, cmd .. " failed:\n" .. out)
        if c.expect then
          H.contains(c.expect, out)
        end
      end
    end
  end)
  for _, p in ipairs(bg) do
    os.execute("kill " .. p.pid .. " 2>/dev/null")
    os.remove(p.log)
  end
  H.psql("DROP SCHEMA IF EXISTS " .. SCHEMA .. " CASCADE")
  if not ok then
    error(err, 0)
  end
end

-- ---- the spec ------------------------------------------------------------------

describe("README.md", function()
  local list = blocks()
  local used = {}

  it("has every shell command and Lua block classified (spec/readme_spec.lua: SH, LUA)", function()
    local unlisted, seen = {}, {}
    for _, b in ipairs(list) do
      if SHELL[b.lang] then
        for _, cmd in ipairs(commands(b)) do
          used[cmd] = true
          if not SH[cmd] then
            unlisted[#unlisted + 1] = ("line %d (%s): %s"):format(b.line, b.lang, cmd)
          end
        end
      elseif b.lang == "lua" then
        local key = first_line(b)
        assert.is_nil(seen[key], "two Lua blocks start with the same line: " .. key)
        seen[key] = true
        used[key] = true
        if not LUA[key] then
          unlisted[#unlisted + 1] = ("line %d (lua): %s"):format(b.line, key)
        end
      end
    end
    assert.are.same({}, unlisted, "README blocks no entry in spec/readme_spec.lua classifies")
    local stale = {}
    for _, t in ipairs({ SH, LUA }) do
      for key in pairs(t) do
        if not used[key] then
          stale[#stale + 1] = key
        end
      end
    end
    table.sort(stale)
    assert.are.same({}, stale, "classified in spec/readme_spec.lua, no longer in README.md")
  end)

  for _, b in ipairs(list) do
    if SHELL[b.lang] then
      local exports, server, server_env = {}, {}, nil
      for _, cmd in ipairs(commands(b)) do
        local c = SH[cmd]
        if c and c.server then
          server[#server + 1] = cmd
          server_env = server_env or { table.unpack(exports) }
        elseif c and c.env then
          exports[#exports + 1] = cmd
        elseif c and c.run then
          local ex = { table.unpack(exports) }
          it(("runs `%s` (line %d)"):format(cmd, b.line), function()
            local ok, out = sh(ex, cmd)
            assert(ok, cmd .. " failed:\n" .. out)
            if c.expect then
              H.contains(c.expect, out)
            end
          end)
        elseif c and c.skip then
          pending(("`%s` (line %d): %s"):format(cmd, b.line, c.skip))
        end
      end
      if #server > 0 then
        describe(("the PostgreSQL commands at line %d"):format(b.line), function()
          if H.require_pg(_ENV) then
            it("run in order against the test server: " .. table.concat(server, "; "), function()
              run_server_sequence(server, server_env)
            end)
          end
        end)
      end
    elseif b.lang == "lua" then
      local c = LUA[first_line(b)]
      if c and c.run then
        it(("runs the Lua block at line %d"):format(b.line), function()
          local ok, out = run_lua(lua_program(b, c))
          assert(ok, "the block at line " .. b.line .. " failed:\n" .. out)
        end)
      elseif c and c.server then
        describe(("the Lua block at line %d"):format(b.line), function()
          if H.require_pg(_ENV) then
            it("runs against the test server", function()
              local ok, out = run_lua(lua_program(b, c))
              H.psql("DROP SCHEMA IF EXISTS " .. SCHEMA .. " CASCADE")
              assert(ok, "the block at line " .. b.line .. " failed:\n" .. out)
            end)
          end
        end)
      elseif c and c.skip then
        pending(("the Lua block at line %d: %s"):format(b.line, c.skip))
      end
    end
  end
end)
