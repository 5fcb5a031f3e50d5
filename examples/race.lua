-- examples/race.lua - replays the seed's promote/resume trace step by step and narrates it.
-- History 3, 4; the promote commits 5 (tool) and 6 (user); the resumed worker
-- commits 7. Cache appends 5, 7, 6; notifications after 4, after 6, after 5.
local chatstream = require("chatstream")

local store = assert(chatstream.open())
local filler = store:create_chat({ title = "another chat" })
store:append(filler, { { role = "user", content = "1" }, { role = "user", content = "2" } })
local chat = store:create_chat({ owner = "alice", title = "seed trace" })
store:append(chat, {
  { role = "user", content = "run the client tool" },
  { role = "assistant", content = "tool call" },
})

local readers = {}
for _, strategy in ipairs({ "last_id", "rescan", "watermark" }) do
  local sub = assert(store:subscribe(chat, { after = 4, strategy = strategy }))
  readers[#readers + 1] = { strategy = strategy, sub = sub, got = {} }
end

local function say(fmt, ...)
  print(string.format(fmt, ...))
end

local function read(label)
  local stats = store:stats()
  for _, r in ipairs(readers) do
    local now = {}
    for ev in r.sub:events(0) do
      now[#now + 1] = ev.id
      r.got[#r.got + 1] = ev.id
    end
    say("    %-9s %-18s delivered [%s]  cursor %d", r.strategy, label, table.concat(now, ", "), r.sub:cursor())
  end
  local after = store:stats()
  say("    (DB passes so far: %d, was %d)", after.db_passes, stats.db_passes)
end

say("chat %d holds 3, 4; three readers subscribe with after = 4", chat)
local promote = store:prepare(chat, { { role = "tool", content = "synthetic result" },
  { role = "user", content = "promoted" } })
say("promote commits %s (tool, user) in one transaction", table.concat(promote:commit(), ", "))
local worker = store:prepare(chat, { role = "assistant", content = "resumed reply" })
say("the resumed worker commits %s", table.concat(worker:commit(), ", "))
promote:cache(1)
say("cache += 5")
worker:cache()
say("cache += 7   (the worker got there first)")
promote:notify(1)
say("notify after 4 -> the readers merge:")
read("on 'after 4'")
promote:cache(2)
say("cache += 6   (too late for a cursor already at 7)")
worker:notify()
say("notify after 6")
promote:notify(2)
say("notify after 5 -> the readers merge:")
read("on 'after 6, 5'")
print()
for _, r in ipairs(readers) do
  local seen = {}
  for _, id in ipairs(r.got) do
    seen[id] = true
  end
  local lost = {}
  for _, id in ipairs({ 5, 6, 7 }) do
    if not seen[id] then
      lost[#lost + 1] = id
    end
  end
  say("%-9s got [%s]%s", r.strategy, table.concat(r.got, ", "),
    #lost > 0 and ("  LOST " .. table.concat(lost, ", ")) or "  complete")
end
