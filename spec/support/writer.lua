-- spec/support/writer.lua - a writer process for spec/multiprocess_spec.lua.
--
-- Run as a separate OS process (the spec spawns it with io.popen), on the
-- same build as the spec (LUA_PATH / LUA_CPATH) and with the environment it
-- inherits as is (a sanitizer build needs its ASan preload in the child too).
--
--   lua5.4 spec/support/writer.lua random  <dsn> <schema> <chats> <batches> <seed> [max_sleep_ms]
--     Appends <batches> batches of 1-3 messages, each to one chat picked at
--     random from <chats> (comma separated ids), with random small sleeps.
--     About one batch in four is committed first and published a few
--     milliseconds later (a slow publisher). Prints only "done <messages>".
--   lua5.4 spec/support/writer.lua promote <dsn> <schema> <chat> [delay_ms] [gap_ms]
--     The seed's promote: commits a tool result and the promoted user message
--     in one transaction, prints "committed <id1> <id2>" (flushed), waits
--     delay_ms, then publishes them slowly: cache + notify message 1, wait
--     gap_ms, cache + notify message 2. Prints "done 2".
--
-- Exit status 0 on success; any failure raises (non-zero status, message on
-- stderr). A watchdog ends the process if it runs for more than 30 s.
local chatstream = require("chatstream")

local mode, dsn, schema = arg[1], arg[2], arg[3]
if not (mode and dsn and schema) then
  io.stderr:write("usage: writer.lua random|promote <dsn> <schema> ...\n")
  os.exit(2)
end

local started = os.time()
local function watchdog()
  if os.time() - started > 30 then
    error("writer: watchdog: running for more than 30 s")
  end
end

local store = assert(chatstream.open({ dsn = dsn, schema = schema, poll_interval = 0 }))

-- Sleeps ms milliseconds. The writer's store listens on nothing, so a step
-- with a timeout is a plain poll(2) sleep: no busy loop stealing the CPU
-- from the other processes, no shell spawned.
local function sleep_ms(ms)
  if ms >= 1 then
    assert(store:step(ms / 1000))
  end
end

local function batch_of(n, tag)
  local roles = { "user", "assistant", "tool" }
  local msgs = {}
  for j = 1, n do
    msgs[j] = { role = roles[(j - 1) % 3 + 1], content = tag .. " m" .. j }
  end
  return msgs
end

if mode == "random" then
  local chats = {}
  for id in (arg[4] or ""):gmatch("%d+") do
    chats[#chats + 1] = math.tointeger(tonumber(id))
  end
  local batches = math.tointeger(tonumber(arg[5] or "")) or error("writer: batches expected")
  local seed = math.tointeger(tonumber(arg[6] or "")) or 1
  local max_sleep = math.tointeger(tonumber(arg[7] or "")) or 3
  assert(#chats > 0, "writer: chats expected")
  math.randomseed(seed)
  local total = 0
  for b = 1, batches do
    watchdog()
    local chat = chats[math.random(#chats)]
    local n = math.random(1, 3)
    local msgs = batch_of(n, string.format("w%d b%d", seed, b))
    if math.random(4) == 1 then
      -- a slow publisher: committed now, published a little later
      local p = assert(store:prepare(chat, msgs))
      local ids = assert(p:commit())
      assert(#ids == n)
      sleep_ms(math.random(1, 4))
      assert(p:publish())
      p:close()
    else
      local ids = assert(store:append(chat, msgs))
      assert(#ids == n)
    end
    total = total + n
    if math.random(3) ~= 1 then
      sleep_ms(math.random(0, max_sleep))
    end
  end
  io.stdout:write("done ", total, "\n")
elseif mode == "promote" then
  local chat = math.tointeger(tonumber(arg[4] or "")) or error("writer: chat expected")
  local delay = math.tointeger(tonumber(arg[5] or "")) or 20
  local gap = math.tointeger(tonumber(arg[6] or "")) or 5
  local p = assert(store:prepare(chat, {
    { role = "tool", content = '{"result":"interrupted by a queued message"}' },
    { role = "user", content = "the queued message" },
  }))
  local ids = assert(p:commit())
  assert(#ids == 2)
  io.stdout:write(string.format("committed %d %d\n", ids[1], ids[2]))
  io.stdout:flush()
  sleep_ms(delay)
  watchdog()
  assert(p:cache(1))
  assert(p:notify(1))
  sleep_ms(gap)
  assert(p:cache(2))
  assert(p:notify(2))
  p:close()
  io.stdout:write("done 2\n")
else
  io.stderr:write("writer: unknown mode '", tostring(mode), "'\n")
  os.exit(2)
end

io.stdout:flush()
store:close()
