-- examples/agent.lua - a Lua agent answering chats, on the embedded store or
-- on PostgreSQL (CHATSTREAM_DSN, schema CHATSTREAM_SCHEMA or "chatstream").
--
--   lua5.4 examples/agent.lua [demo]       the whole story in one process
--   lua5.4 examples/agent.lua work [--worker NAME] [--idle SECONDS]
--                                          a worker: answers pending chats
--   lua5.4 examples/agent.lua new TEXT     a new chat with a first message
--   lua5.4 examples/agent.lua send CHAT TEXT
--   lua5.4 examples/agent.lua promote CHAT promotes the head of the queue
--
-- The agent is chatstream.agent.scripted, a deterministic script (no model):
-- "/tool ..." asks the client to run a tool (the chat then requires action),
-- "/calc ..." runs a server tool, anything else gets "reply to: ...".
-- On PostgreSQL, run `work` in one terminal, `examples/tail.lua CHAT` in a
-- second, and `new`, `send`, `promote` in a third. On the embedded store the
-- database lives in one process: `demo` plays every part there.
local chatstream = require("chatstream")
local agent = require("chatstream.agent")

local dsn = os.getenv("CHATSTREAM_DSN")
local store = assert(chatstream.open(dsn and { dsn = dsn, schema = os.getenv("CHATSTREAM_SCHEMA") }))
assert(store:migrate())
local owner = os.getenv("USER") or "demo"

local function usage()
  io.stderr:write("usage: agent.lua [demo] | work [--worker NAME] [--idle SECONDS]\n"
    .. "       agent.lua new TEXT | send CHAT TEXT | promote CHAT\n")
  os.exit(2)
end

local function chat_arg(s)
  local id = math.tointeger(tonumber(s or ""))
  if not id or id < 1 then
    usage()
  end
  return id
end

local cmd = arg[1] or "demo"

if cmd == "work" then
  local worker, idle = "agent-" .. tostring(os.time()), nil
  local i = 2
  while arg[i] do
    if arg[i] == "--worker" and arg[i + 1] then
      worker = arg[i + 1]
    elseif arg[i] == "--idle" and tonumber(arg[i + 1] or "") then
      idle = tonumber(arg[i + 1])
    else
      usage()
    end
    i = i + 2
  end
  if store:kind() == "memory" then
    io.stderr:write("agent.lua work: the embedded store lives in this process only; "
      .. "set CHATSTREAM_DSN, or run `agent.lua demo`\n")
    os.exit(2)
  end
  print(("worker %s on %s: waiting for pending chats%s"):format(worker, store:kind(),
    idle and (" (stops after " .. idle .. " s idle)") or " (Ctrl-C stops)"))
  local n = agent.run(store, {
    worker = worker, idle = idle, poll = 0.1,
    on_turn = function(chat, final, ids)
      print(("chat %d: appended %d message(s), now %s"):format(chat, #ids, final))
      io.stdout:flush()
    end,
  })
  print(("worker %s: %d turn(s)"):format(worker, n))
elseif cmd == "new" then
  local text = arg[2] or usage()
  local chat = assert(store:create_chat({ owner = owner, title = text:sub(1, 60) }))
  assert(store:send(chat, { content = text, actor = owner }))
  print(chat)
elseif cmd == "send" then
  local chat, text = chat_arg(arg[2]), arg[3] or usage()
  local id, queued = assert(store:send(chat, { content = text, actor = owner }))
  print(queued and ("queued as #" .. id) or ("message #" .. id))
elseif cmd == "promote" then
  local chat = chat_arg(arg[2])
  local q = assert(store:queued(chat, { actor = owner }))
  if #q == 0 then
    print("the queue of chat " .. chat .. " is empty")
  else
    local ids = assert(store:promote_queued(chat, q[1].id, { actor = owner }))
    print(#ids > 0 and ("promoted: messages " .. table.concat(ids, ", "))
      or "the worker is running: the item goes first, the worker stops and promotes it")
  end
elseif cmd == "demo" then
  -- One process plays the client, the worker and a reader.
  local wait = store:kind() == "postgresql" and 0.3 or 0
  local chat = assert(store:create_chat({ owner = owner, title = "agent demo" }))
  local reader <close> = assert(store:subscribe(chat, { actor = owner, ordered = true }))
  local function show(label)
    print("-- " .. label)
    for ev in reader:events(wait) do
      print("   " .. chatstream.format_event(ev))
    end
  end
  local function work()
    agent.run(store, { worker = "demo-worker", idle = 0, turns = 1 })
  end
  show("a reader subscribes (ordered): the snapshot starts with the status")
  assert(store:send(chat, { content = "/tool what is the weather in Paris?", actor = owner }))
  work()
  show("the user asks; the agent asks the client to run a tool")
  local q = assert(store:send(chat, { content = "never mind, just say hello", actor = owner }))
  show("the user sends another message while the chat waits: it is queued")
  assert(store:promote_queued(chat, q, { actor = owner }))
  work()
  show("promoted: a synthetic tool result, the message, then the agent's reply")
  print(("chat %d is %s, queue: %d item(s)"):format(chat, store:chat(chat).status, #store:queued(chat)))
else
  usage()
end
