-- core/tests/tsan_engine.lua - the engine's hand-over under ThreadSanitizer
-- (make test-tsan): in a cqueues loop, a writer appends 2,000 messages
-- through the store's engine (each statement's wait parks the call on the
-- engine thread and hands the loop back), a follower serves store:ready(),
-- a reader waits in sub:next(timeout), and a third coroutine drops
-- subscriptions and collects them while calls are parked (their closes wait
-- for the engine's call). Every follower must get every message once, in
-- order. Spawns no process (a shell under the TSan preload would not start).
local cqueues = require("cqueues")
local cs = require("chatstream.cqueues")
local dsn = assert(os.getenv("CHATSTREAM_TEST_DSN"), "CHATSTREAM_TEST_DSN is not set")
local schema = "tsan_engine_" .. os.time() % 100000
local store = assert(cs.open({ dsn = dsn, schema = schema, poll_interval = 0.2 }))
assert(store:migrate())
local N, C = 2000, 4
local chats, subs, got, want = {}, {}, {}, {}
local waiter_got, done = 0, false
local mine = {} -- the follower serves its own subscriptions only
local cq = cqueues.new()
cq:wrap(function() -- the follower
  for c = 1, C do
    chats[c] = assert(store:create_chat({ owner = "tsan" }))
    subs[c] = assert(store:subscribe(chats[c]))
    mine[subs[c]] = true
    got[c], want[c] = {}, {}
  end
  local total = 0
  while total < N do
    for _, sub in ipairs(store:ready()) do
      while mine[sub] do
        local ev = sub:next(0)
        if not ev then break end
        if ev.kind == "message" then
          for c = 1, C do
            if subs[c] == sub then table.insert(got[c], ev.id) end
          end
          total = total + 1
        end
      end
    end
    if total < N then
      cs.wait(store, 5)
      store:step()
    end
  end
  done = true
end)
cq:wrap(function() -- the writer
  while not subs[C] do cqueues.sleep(0.005) end
  for i = 1, N do
    local c = (i - 1) % C + 1
    table.insert(want[c], assert(store:append(chats[c], { role = "user", content = "m" .. i }))[1])
  end
end)
cq:wrap(function() -- a reader waiting in next(timeout) on its own subscription
  while not subs[C] do cqueues.sleep(0.005) end
  local sub = assert(store:subscribe(chats[1]))
  while not done do
    local ev = sub:next(0.5)
    if ev and ev.kind == "message" then waiter_got = waiter_got + 1 end
  end
  sub:close()
end)
cq:wrap(function() -- subscriptions dropped and collected while calls are parked
  while not subs[C] do cqueues.sleep(0.005) end
  while not done do
    assert(store:subscribe(chats[2])) -- dropped at once
    collectgarbage()
    cqueues.sleep(0.01)
  end
end)
assert(cq:loop())
for c = 1, C do
  assert(#got[c] == #want[c], ("chat %d: got %d of %d"):format(c, #got[c], #want[c]))
  for i = 1, #want[c] do
    assert(got[c][i] == want[c][i], ("chat %d message %d"):format(c, i))
  end
end
assert(waiter_got == #want[1], ("the waiting reader got %d of %d"):format(waiter_got, #want[1]))
cs.close(store)
local admin = assert(require("chatstream").open({ dsn = dsn, schema = schema, poll_interval = 0 }))
admin:close()
print(("tsan_engine: %d delivered once, in order, to %d followers; the waiting reader got %d"):format(N, C,
  waiter_got))
