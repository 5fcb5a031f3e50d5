-- spec/docs_spec.lua - the reference cannot fall behind the module: every
-- public function, method and field of the loaded module (the classes' method
-- tables walked at runtime, on live handles) has an entry in what LDoc reads
-- for `make docs` (doc/config.ld, listed through spec/support/ldoc_index.lua)
-- and a LuaLS annotation in types/; every documented name exists at runtime;
-- the event tables' documented fields are the ones events carry.
local chatstream = require("chatstream")
local core = require("chatstream.core")

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "../"

-- chatstream.web's Server methods that only the server itself calls (its
-- coroutines, lua-http's onstream), not programs: not part of the API.
local WEB_INTERNAL = {
  pump = true, let_go = true, dispatch = true, events = true, post_message = true,
  create_chat = true, page = true, route = true, onstream = true,
}

-- ---- what LDoc documents ------------------------------------------------

local function sh_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

--- Runs LDoc on doc/config.ld with the index filter: a set of
-- "module name" -> {kind, params, fields}.
local function ldoc_index()
  local ldoc = "/usr/bin/ldoc"
  assert(io.open(ldoc), "LDoc is missing: install lua-ldoc (scripts/bootstrap does)")
  -- Not under the ASan preload of a sanitizer run: LDoc is plain Lua.
  local cmd = ("cd %s && env -u LD_PRELOAD LUA_PATH=%s lua5.4 %s -c doc/config.ld --filter "
    .. "support.ldoc_index.print doc 2>&1"):format(sh_quote(ROOT), sh_quote("spec/?.lua;;"), ldoc)
  local f = assert(io.popen(cmd, "r"))
  local out = f:read("a")
  local ok = f:close()
  assert(ok, "ldoc failed:\n" .. out)
  local index = {}
  for line in out:gmatch("[^\n]+") do
    local mod, name, kind, params, fields = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$")
    assert(mod, "unexpected LDoc output line: " .. line)
    if kind ~= "module" then
      local set = {}
      for fld in fields:gmatch("[^,]+") do
        set[fld] = true
      end
      index[mod .. " " .. name] = { kind = kind, params = params, fields = set }
    end
  end
  return index
end

-- ---- what the LuaLS annotations declare ------------------------------------

local TYPES = {
  "types/chatstream.lua", "types/chatstream/core.lua", "types/chatstream/agent.lua",
  "types/chatstream/loop.lua", "types/chatstream/cqueues.lua", "types/chatstream/luv.lua",
  "types/chatstream/web.lua",
}

--- Reads the ---@meta files: "class name" -> {params = {...}, doc = set of
-- ---@param names} for functions, and "class field" -> true for ---@field.
local function luals_index()
  local funcs, fields, problems = {}, {}, {}
  for _, file in ipairs(TYPES) do
    local path = ROOT .. file
    assert(loadfile(path), file .. " does not compile") -- compiled, never run
    local var_class, class, block = {}, nil, {}
    local first = true
    for line in io.lines(path) do
      if first then
        assert(line:match("^%-%-%-@meta "), file .. " must start with ---@meta")
        first = false
      end
      local c = line:match("^%-%-%-@class ([%w_.]+)")
      if c then
        class = c
      end
      local fld = line:match("^%-%-%-@field ([%w_]+)")
      if fld and class then
        fields[class .. " " .. fld] = true
      end
      local var = line:match("^local ([%w_]+) = {}")
      if var and class then
        var_class[var] = class
      end
      local tvar, sep, name, args = line:match("^function ([%w_]+)([.:])([%w_]+)%(([^)]*)%)")
      if tvar then
        local cls = var_class[tvar]
        if not cls then
          problems[#problems + 1] = ("%s: %s has no ---@class"):format(file, tvar)
        else
          local doc = {}
          for _, l in ipairs(block) do
            local p = l:match("^%-%-%-@param ([%w_.]+)")
            if p then
              doc[p] = true
            end
          end
          local params = {}
          for a in args:gmatch("[^,%s]+") do
            params[#params + 1] = a
          end
          funcs[cls .. " " .. name] = { params = params, doc = doc, sep = sep, file = file }
        end
      end
      if line:match("^%-%-%-") then
        block[#block + 1] = line
      else
        block = {}
      end
    end
  end
  return funcs, fields, problems
end

-- ---- what the loaded module has ----------------------------------------------

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    if type(k) == "string" and k:sub(1, 2) ~= "__" then
      keys[#keys + 1] = k
    end
  end
  table.sort(keys)
  return keys
end

--- Every public table of the module, on live handles: {doc = LDoc module,
-- prefix = "Class:" or "", luals = LuaLS class, tbl = the table}.
local function runtime_targets(handles)
  local cq = require("chatstream.cqueues")
  local web = require("chatstream.web")
  local server = getmetatable(handles.srv).__index
  local web_methods = {}
  for k, v in pairs(server) do
    if not WEB_INTERNAL[k] then
      web_methods[k] = v
    end
  end
  return {
    { doc = "chatstream", prefix = "", luals = "chatstream", tbl = chatstream },
    { doc = "chatstream", prefix = "Store:", luals = "chatstream.Store", tbl = getmetatable(handles.store).__index },
    { doc = "chatstream", prefix = "Subscription:", luals = "chatstream.Subscription",
      tbl = getmetatable(handles.sub).__index },
    { doc = "chatstream", prefix = "Publish:", luals = "chatstream.Publish", tbl = getmetatable(handles.pub).__index },
    { doc = "chatstream", prefix = "MemoryDB:", luals = "chatstream.MemoryDB", tbl = getmetatable(handles.db).__index },
    { doc = "chatstream.core", prefix = "", luals = "chatstream.core", tbl = core },
    { doc = "chatstream.core", prefix = "Engine:", luals = "chatstream.Engine",
      tbl = getmetatable(handles.engine).__index },
    { doc = "chatstream.agent", prefix = "", luals = "chatstream.agent", tbl = require("chatstream.agent") },
    { doc = "chatstream.loop", prefix = "", luals = "chatstream.loop", tbl = require("chatstream.loop") },
    { doc = "chatstream.cqueues", prefix = "", luals = "chatstream.cqueues", tbl = cq },
    -- what chatstream.loop.adapter returns (types/: chatstream.Adapter): cqueues' is one
    { doc = "chatstream.cqueues", prefix = "", luals = "chatstream.Adapter", tbl = cq },
    { doc = "chatstream.luv", prefix = "", luals = "chatstream.luv", tbl = require("chatstream.luv") },
    { doc = "chatstream.web", prefix = "", luals = "chatstream.web", tbl = web },
    { doc = "chatstream.web", prefix = "Server:", luals = "chatstream.web.Server", tbl = web_methods },
  }
end

local function open_handles()
  local h = {}
  h.store = chatstream.open()
  local chat = h.store:create_chat({ owner = "docs" })
  h.sub = assert(h.store:subscribe(chat))
  h.pub = assert(h.store:prepare(chat, { role = "user", content = "x" }))
  h.db = chatstream.memory()
  h.engine = core.engine()
  h.cqstore = assert(require("chatstream.cqueues").open())
  h.srv = assert(require("chatstream.web").listen({ store = h.cqstore, port = 0, log = function() end }))
  function h.close()
    h.srv:close()
    h.cqstore:close()
    h.engine:close()
    h.db:close()
    h.pub:close()
    h.sub:close()
    h.store:close()
  end
  return h
end

--- The events a memory store hands over: one of each kind, with every
-- optional field (tool calls, a recorded error, archived).
local function sample_events()
  local store <close> = chatstream.open()
  local chat = store:create_chat({ owner = "docs" })
  local first = assert(store:send(chat, { content = "hi" }))
  local sub <close> = assert(store:subscribe(chat))
  assert(store:send(chat, { content = "queued" }))
  assert(store:acquire({ worker = "w" })[1] == chat)
  assert(store:publish_part(chat, "delta"))
  assert(store:append(chat, {
    { role = "assistant", content = "calling", tool_calls = { "call-1" } },
    { role = "tool", tool_call_id = "call-1", content = "42" },
  }, { worker = "w" }))
  assert(store:finish(chat, "error", { worker = "w", error = "boom" }))
  assert(store:archive(chat))
  local evs = {}
  local function drain()
    for ev in sub:events(0) do
      evs[#evs + 1] = ev
    end
  end
  drain()
  if store.edit then -- landing on main: then its truncate event is checked too
    assert(store:unarchive(chat))
    assert(store:edit(chat, first, { content = "edited" }))
    drain()
  end
  return evs
end

local EVENT_CLASS = {
  message = "chatstream.MessageEvent", status = "chatstream.StatusEvent", queue = "chatstream.QueueEvent",
  part = "chatstream.PartEvent", truncate = "chatstream.TruncateEvent",
}

-- ---- the checks ---------------------------------------------------------------

describe("the reference (make docs) and the LuaLS annotations", function()
  local index, funcs, fields, problems, handles, targets

  setup(function()
    index = ldoc_index()
    funcs, fields, problems = luals_index()
    handles = open_handles()
    targets = runtime_targets(handles)
  end)

  teardown(function()
    if handles then
      handles.close()
    end
  end)

  it("documents every public function, method and field of the loaded module", function()
    local missing = {}
    for _, t in ipairs(targets) do
      for _, k in ipairs(sorted_keys(t.tbl)) do
        local item = index[t.doc .. " " .. t.prefix .. k]
        if not item then
          missing[#missing + 1] = t.doc .. " " .. t.prefix .. k
        elseif type(t.tbl[k]) == "function" and item.kind ~= "function" then
          missing[#missing + 1] = t.doc .. " " .. t.prefix .. k .. " (documented as a " .. item.kind .. ")"
        end
      end
    end
    assert.are.same({}, missing, "no LDoc entry in doc/*.ldoc.lua")
  end)

  it("annotates every public function, method and field for LuaLS, each parameter with ---@param", function()
    assert.are.same({}, problems)
    local missing = {}
    for _, t in ipairs(targets) do
      for _, k in ipairs(sorted_keys(t.tbl)) do
        local key = t.luals .. " " .. k
        local f = funcs[key]
        if type(t.tbl[k]) == "function" then
          if not f then
            missing[#missing + 1] = key .. " (no annotated function in types/)"
          else
            local want = t.prefix == "" and "." or ":"
            if f.sep ~= want then
              missing[#missing + 1] = key .. " (declared with '" .. f.sep .. "', called with '" .. want .. "')"
            end
            for _, p in ipairs(f.params) do
              if not f.doc[p] then
                missing[#missing + 1] = key .. " (no ---@param " .. p .. ")"
              end
            end
          end
        elseif not fields[key] then
          missing[#missing + 1] = key .. " (no ---@field)"
        end
      end
    end
    assert.are.same({}, missing, "missing LuaLS annotations in types/")
  end)

  it("documents nothing the loaded module does not have", function()
    local by_doc, by_luals = {}, {}
    for _, t in ipairs(targets) do
      by_doc[t.doc .. " " .. t.prefix] = t.tbl
      by_luals[t.luals] = t.tbl
    end
    local stale = {}
    for key, item in pairs(index) do
      if item.kind == "function" or item.kind == "field" then
        local mod, name = key:match("^(%S+) (.+)$")
        local prefix, member = name:match("^(%w+:)([%w_]+)$")
        local tbl = by_doc[mod .. " " .. (prefix or "")]
        member = member or name
        if not (tbl and tbl[member] ~= nil) then
          stale[#stale + 1] = key .. " (LDoc)"
        end
      end
    end
    for key in pairs(funcs) do
      local cls, member = key:match("^(%S+) (.+)$")
      local tbl = by_luals[cls]
      if not (tbl and tbl[member] ~= nil) then
        stale[#stale + 1] = key .. " (types/)"
      end
    end
    table.sort(stale)
    assert.are.same({}, stale, "documented, but not in the loaded module")
  end)

  it("documents each event kind with exactly the fields its events carry", function()
    local seen = {}
    for _, ev in ipairs(sample_events()) do
      seen[ev.kind] = seen[ev.kind] or {}
      for k in pairs(ev) do
        seen[ev.kind][k] = true
      end
    end
    local problems_found = {}
    for kind, keys in pairs(seen) do
      local item = index["chatstream " .. kind]
      if not item or item.kind ~= "table" then
        problems_found[#problems_found + 1] = "no LDoc table for the " .. kind .. " event"
      else
        for k in pairs(keys) do
          if not item.fields[k] then
            problems_found[#problems_found + 1] = ("LDoc %s event: no @field %s"):format(kind, k)
          end
          if not fields[EVENT_CLASS[kind] .. " " .. k] then
            problems_found[#problems_found + 1] = ("types/ %s: no ---@field %s"):format(EVENT_CLASS[kind], k)
          end
        end
        for k in pairs(item.fields) do
          if not keys[k] then
            problems_found[#problems_found + 1] = ("LDoc %s event: @field %s, which no event carries"):format(kind, k)
          end
        end
      end
    end
    -- every documented event table (a table with a kind field) is produced
    for key, item in pairs(index) do
      local kind = key:match("^chatstream (%l+)$")
      if kind and item.kind == "table" and item.fields.kind and not seen[kind] then
        problems_found[#problems_found + 1] = "LDoc documents a " .. kind .. " event nothing produced"
      end
    end
    table.sort(problems_found)
    assert.are.same({}, problems_found)
  end)
end)
