-- examples/tail.lua - prints a chat live: the snapshot, then every event.
--
--   CHATSTREAM_DSN=... lua5.4 examples/tail.lua CHAT [--after N] [--strategy S] [--idle SECONDS]
--   lua5.4 examples/tail.lua                 (embedded store: a scripted chat)
--
-- On PostgreSQL it follows CHAT until idle for --idle seconds (default: until
-- interrupted); pair it with `examples/agent.lua work` and `agent.lua send`.
-- The embedded store cannot be written by another process, so without
-- CHATSTREAM_DSN this process plays a short conversation itself (the
-- scripted agent answering) and tails it as it goes.
local chatstream = require("chatstream")
local agent = require("chatstream.agent")

local dsn = os.getenv("CHATSTREAM_DSN")
local store = assert(chatstream.open(dsn and { dsn = dsn, schema = os.getenv("CHATSTREAM_SCHEMA") }))
assert(store:migrate())

local chat, opts, idle = nil, {}, nil
local i = 1
while arg[i] do
  local a, v = arg[i], arg[i + 1]
  if a == "--after" and math.tointeger(tonumber(v or "")) then
    opts.after = math.tointeger(tonumber(v))
  elseif a == "--strategy" and v then
    opts.strategy = v
  elseif a == "--idle" and tonumber(v or "") then
    idle = tonumber(v)
  elseif not chat and math.tointeger(tonumber(a)) then
    chat = math.tointeger(tonumber(a))
    v = nil
  else
    io.stderr:write("usage: tail.lua [CHAT] [--after N] [--strategy S] [--idle SECONDS]\n")
    os.exit(2)
  end
  i = i + (v and 2 or 1)
end

local function print_event(ev)
  print(("[chat %d] %s"):format(ev.chat_id, chatstream.format_event(ev)))
  io.stdout:flush()
end

if store:kind() == "postgresql" and chat then
  local sub <close> = assert(store:subscribe(chat, opts))
  local quiet = 0
  while not idle or quiet < idle do
    local ev, err, code = sub:next(0.5)
    if ev then
      quiet = 0
      print_event(ev)
    elseif code == "ETIMEDOUT" then
      quiet = quiet + 0.5
    else
      error(err)
    end
  end
  print(("-- idle for %g s; resume later with --after %d"):format(idle, sub:cursor()))
elseif store:kind() == "postgresql" then
  io.stderr:write("tail.lua: which chat? (tail.lua CHAT)\n")
  os.exit(2)
else
  -- The embedded store: a scripted conversation, tailed as it happens.
  chat = chat or store:create_chat({ owner = "demo", title = "tail demo" })
  local sub <close> = assert(store:subscribe(chat, opts))
  local script = {
    function() store:send(chat, { content = "hello" }) end,
    function() agent.run(store, { worker = "w", idle = 0, turns = 1 }) end,
    function() store:send(chat, { content = "/calc 6*7" }) end,
    function() agent.run(store, { worker = "w", idle = 0, turns = 1 }) end,
    function() store:send(chat, { content = "/tool open the door" }) end,
    function() agent.run(store, { worker = "w", idle = 0, turns = 1 }) end,
  }
  for _, step in ipairs(script) do
    step()
    for ev in sub:events(0) do
      print_event(ev)
    end
  end
  print(("-- chat %d is %s; cursor %d"):format(chat, store:chat(chat).status, sub:cursor()))
end
