-- examples/race.lua - replays the seed's promote/resume trace step by step and narrates it.
-- History 3, 4; the promote commits 5 (tool) and 6 (user); the resumed worker
-- commits 7. Cache appends 5, 7, 6; notifications after 4, after 6, after 5.
-- On the memory store the IDs are exactly those; with CHATSTREAM_DSN set it
-- runs on PostgreSQL (schema CHATSTREAM_SCHEMA) with whatever IDs come.
local chatstream = require("chatstream")

local dsn = os.getenv("CHATSTREAM_DSN")
local store = assert(chatstream.open(dsn and { dsn = dsn, schema = os.getenv("CHATSTREAM_SCHEMA") }))
assert(store:migrate())
local wait = store:kind() == "postgresql" and 0.3 or 0
local filler = store:create_chat({ title = "another chat" })
store:append(filler, { { role = "user", content = "1" }, { role = "user", content = "2" } })
local chat = store:create_chat({ owner = "alice", title = "seed trace" })
local history = store:append(chat, {
  { role = "user", content = "run the client tool" },
  { role = "assistant", content = "tool call" },
})
local after = history[2]

local readers = {}
for _, strategy in ipairs({ "last_id", "rescan", "watermark" }) do
  local sub = assert(store:subscribe(chat, { after = after, strategy = strategy }))
  readers[#readers + 1] = { strategy = strategy, sub = sub, got = {} }
end

local function say(fmt, ...)
  print(string.format(fmt, ...))
end

local function read(label)
  local before = store:stats().db_passes
  for _, r in ipairs(readers) do
    local now = {}
    for ev in r.sub:events(wait) do
      if ev.kind == "message" then -- the snapshot's status is not the point here
        now[#now + 1] = ev.id
        r.got[#r.got + 1] = ev.id
      end
    end
    say("    %-9s %-18s delivered [%s]  cursor %d", r.strategy, label, table.concat(now, ", "), r.sub:cursor())
  end
  say("    (DB passes by the three readers: %d)", store:stats().db_passes - before)
end

say("chat %d holds %d, %d; three readers subscribe with after = %d", chat, history[1], history[2], after)
local promote = store:prepare(chat, { { role = "tool", content = "synthetic result" },
  { role = "user", content = "promoted" } })
local p_ids = promote:commit()
say("promote commits %d, %d (tool, user) in one transaction", p_ids[1], p_ids[2])
local worker = store:prepare(chat, { role = "assistant", content = "resumed reply" })
local w_id = worker:commit()[1]
say("the resumed worker commits %d", w_id)
promote:cache(1)
say("cache += %d", p_ids[1])
worker:cache()
say("cache += %d   (the worker got there first)", w_id)
promote:notify(1)
say("notify after %d -> the readers merge:", after)
read("on 'after " .. after .. "'")
promote:cache(2)
say("cache += %d   (too late for a cursor already at %d)", p_ids[2], w_id)
worker:notify()
say("notify after %d", p_ids[2])
promote:notify(2)
say("notify after %d -> the readers merge:", p_ids[1])
read("on the late ones")
print()
for _, r in ipairs(readers) do
  local seen = {}
  for _, id in ipairs(r.got) do
    seen[id] = true
  end
  local lost = {}
  for _, id in ipairs({ p_ids[1], p_ids[2], w_id }) do
    if not seen[id] then
      lost[#lost + 1] = id
    end
  end
  say("%-9s got [%s]%s", r.strategy, table.concat(r.got, ", "),
    #lost > 0 and ("  LOST " .. table.concat(lost, ", ")) or "  complete")
end
store:close()
