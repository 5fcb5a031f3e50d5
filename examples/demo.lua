-- examples/demo.lua - a scripted conversation in which a promote/resume race happens.
-- Runs on the embedded memory store: no server needed. With CHATSTREAM_DSN set
-- it runs on that PostgreSQL server instead (schema CHATSTREAM_SCHEMA, default
-- "chatstream", migrated first).
--
-- The chat waits on a client tool (requires_action). The user sends another
-- message meanwhile; it is promoted: one transaction commits a synthetic tool
-- result and the promoted user message. A worker resumes at once and commits
-- its reply. The two publishes interleave: the reply reaches the cache before
-- the promoted message, and the notifications arrive out of order. Three
-- readers watch, one per merge strategy.
local chatstream = require("chatstream")

local dsn = os.getenv("CHATSTREAM_DSN")
local store = assert(chatstream.open(dsn and { dsn = dsn, schema = os.getenv("CHATSTREAM_SCHEMA") }))
assert(store:migrate())
-- PostgreSQL delivers notifications asynchronously: read with a short wait.
local wait = store:kind() == "postgresql" and 0.3 or 0
local chat = store:create_chat({ owner = "alice", title = "deploy helper" })

store:append(chat, {
  { role = "user", content = "Deploy the staging branch, please." },
  { role = "assistant", content = "I need your approval first: calling tool `confirm_deploy`." },
})

local readers = {}
for _, strategy in ipairs(chatstream.strategies) do
  readers[#readers + 1] = {
    strategy = strategy,
    sub = assert(store:subscribe(chat, { strategy = strategy })),
    got = {},
  }
end
readers[#readers + 1] = {
  strategy = "watermark, unordered",
  sub = assert(store:subscribe(chat, { ordered = false })),
  got = {},
}

-- The messages each reader gets (the snapshot also starts with the chat's
-- status: this demo is about the messages).
local function read_all()
  for _, r in ipairs(readers) do
    for ev in r.sub:events(wait) do
      if ev.kind == "message" then
        r.got[#r.got + 1] = ev
      end
    end
  end
end
read_all() -- the snapshot

-- The promote: synthetic tool result + the queued user message, one commit.
local promote = store:prepare(chat, {
  { role = "tool", content = "(interrupted: the user sent a new message)" },
  { role = "user", content = "Actually, deploy main instead." },
})
promote:commit()
-- The worker picks the chat up and answers, all within milliseconds.
local worker = store:prepare(chat, { role = "assistant", content = "Deploying main to staging now." })
worker:commit()

-- Publishing interleaves: cache 5, cache 7, notify 5 ... cache 6 comes late.
promote:cache(1)
worker:cache()
promote:notify(1)
read_all() -- the readers run their merge now
promote:cache(2)
worker:notify()
promote:notify(2)
read_all()

-- What the database holds: the truth.
local truth = {}
do
  local sub <close> = assert(store:subscribe(chat))
  for ev in sub:events(wait) do
    if ev.kind == "message" then
      truth[#truth + 1] = ev
    end
  end
end

print("The stream as the default (watermark) reader saw it:")
for _, ev in ipairs(readers[1].got) do
  print(string.format("  #%d %-9s %s", ev.id, ev.role, ev.content))
end
print()
print(string.format("The chat holds %d messages (%s store). Per strategy:", #truth, store:kind()))
for _, r in ipairs(readers) do
  local seen, dup, lost = {}, 0, 0
  for _, ev in ipairs(r.got) do
    if seen[ev.id] then
      dup = dup + 1
    end
    seen[ev.id] = true
  end
  local missing = {}
  for _, ev in ipairs(truth) do
    if not seen[ev.id] then
      lost = lost + 1
      missing[#missing + 1] = "#" .. ev.id
    end
  end
  print(string.format("  %-20s got %d, lost %d, twice %d%s", r.strategy, #r.got, lost, dup,
    lost > 0 and ("  (missing " .. table.concat(missing, ", ") .. ")") or ""))
  r.sub:close()
end
store:close()
