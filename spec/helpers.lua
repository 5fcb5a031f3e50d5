-- spec/helpers.lua - shared helpers for the busted specs.
local chatstream = require("chatstream")

local H = {}

H.strategies = { "last_id", "rescan", "watermark" }

--- Drains a subscription (non-blocking) and returns the message ids got.
function H.drain(sub, into)
  into = into or {}
  for ev in sub:events(0) do
    if ev.kind == "message" then
      into[#into + 1] = ev.id
    end
  end
  return into
end

--- Compares what a reader got with the chat's ids (ascending list `want`).
-- Returns lost (ids never got), dups (ids got more than once).
function H.check(got, want)
  local seen, lost, dups = {}, {}, {}
  for _, id in ipairs(got) do
    if seen[id] then
      dups[#dups + 1] = id
    end
    seen[id] = true
  end
  for _, id in ipairs(want) do
    if not seen[id] then
      lost[#lost + 1] = id
    end
  end
  return lost, dups
end

--- A memory store with `n` filler messages in another chat, so the next ids
-- start at n + 1 (to replay traces with their own ids).
function H.store_at(n, opts)
  local store = assert(chatstream.open(opts))
  if n > 0 then
    local filler = store:create_chat({ title = "filler" })
    local msgs = {}
    for i = 1, n do
      msgs[i] = { role = "user", content = "filler " .. i }
    end
    store:append(filler, msgs)
  end
  return store
end

return H
