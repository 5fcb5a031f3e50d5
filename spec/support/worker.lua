-- spec/support/worker.lua - the worker process of spec/integration_spec.lua.
--
--   lua5.4 spec/support/worker.lua <dsn> <schema> <stopfile> [watchdog_s]
--
-- Runs the scripted agent (chatstream.agent) on every chat it can acquire,
-- on PostgreSQL, until <stopfile> exists. The first time it acquires a chat
-- it also subscribes four readers to it from its own store (after = 0):
-- last_id, rescan, watermark and watermark ordered. So the readers share the
-- worker's cache, as the seed's subscribers share the daemon's: the worker's
-- reply is cached here before the promoted messages (committed and published
-- by another process) are, which is the interleaving the seed's fix is about.
-- The readers are read only while the worker has nothing to do.
--
-- When the stop file appears, it reads the readers until they are quiet and
-- prints, per chat and reader:
--   got <chat> <strategy> <id,id,...>
--   status <chat> <strategy> <status> <version>
-- then "turns <n>" and exits 0. Any failure raises (non-zero exit status).
local chatstream = require("chatstream")
local agent = require("chatstream.agent")

local dsn, schema, stopfile = arg[1], arg[2], arg[3]
local watchdog = tonumber(arg[4] or "") or 120
if not (dsn and schema and stopfile) then
  io.stderr:write("usage: worker.lua <dsn> <schema> <stopfile> [watchdog_s]\n")
  os.exit(2)
end

local store = assert(chatstream.open({ dsn = dsn, schema = schema, poll_interval = 0 }))
local started = os.time()

local READERS = {
  { name = "last_id", opts = { strategy = "last_id" } },
  { name = "rescan", opts = { strategy = "rescan" } },
  -- watermark delivering as found (ordered, its default, is the next row)
  { name = "watermark", opts = { strategy = "watermark", ordered = false } },
  { name = "ordered", opts = { strategy = "watermark", ordered = true } },
}

local chats, order = {}, {} -- chat id -> { reader name -> {sub, got, status} }

local function open_readers(chat)
  if chats[chat] then
    return
  end
  local rs = {}
  for _, r in ipairs(READERS) do
    rs[r.name] = { sub = assert(store:subscribe(chat, r.opts)), got = {} }
  end
  chats[chat] = rs
  order[#order + 1] = chat
end

local function read_all(timeout)
  for _, chat in ipairs(order) do
    for _, r in ipairs(READERS) do
      local st = chats[chat][r.name]
      for ev in st.sub:events(timeout) do
        if ev.kind == "message" then
          st.got[#st.got + 1] = ev.id
        elseif ev.kind == "status" then
          st.status = ev
        end
      end
    end
  end
end

local function exists(path)
  local f = io.open(path, "r")
  if f then
    f:close()
  end
  return f ~= nil
end

local turns = 0
while not exists(stopfile) do
  if os.time() - started > watchdog then
    error("worker: watchdog: running for more than " .. watchdog .. " s")
  end
  local ids = assert(store:acquire({ worker = "spec-worker", limit = 4 }))
  if #ids == 0 then
    read_all(0)
    store:step(0.005)
  else
    for _, chat in ipairs(ids) do
      open_readers(chat)
      agent.turn(store, chat, { worker = "spec-worker" })
      turns = turns + 1
    end
  end
end

-- Until quiet for 0.3 s (no notification came in): then every
-- notification has come in, and reading merges them all.
local quiet = 0
while quiet < 0.3 do
  local n = assert(store:step(0.05))
  quiet = n > 0 and 0 or quiet + 0.05
  read_all(0)
end
read_all(0)
for _, chat in ipairs(order) do
  for _, r in ipairs(READERS) do
    local st = chats[chat][r.name]
    local ids = {}
    for i, id in ipairs(st.got) do
      ids[i] = tostring(id)
    end
    print(("got %d %s %s"):format(chat, r.name, table.concat(ids, ",")))
    if st.status then
      print(("status %d %s %s %d"):format(chat, r.name, st.status.status, st.status.version))
    end
    st.sub:close()
  end
end
print("turns " .. turns)
store:close()
