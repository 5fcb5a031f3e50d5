-- core/tests/tsan_listener.lua - the listener thread's hand-over under
-- ThreadSanitizer (make test-tsan): a reader store subscribed while another
-- store writes 3,000 notifications of 2 KB (more than the thread's 4 MiB
-- buffer: an overflow), its listener backend killed half way (a background
-- reconnect); the reader must get every message once, in order. Spawns no
-- process (a shell under the TSan preload would not start): the kill comes
-- from `make test-tsan`, which reads the pid this writes to TSAN_PIDFILE.
local cs = require("chatstream")
local dsn = assert(os.getenv("CHATSTREAM_TEST_DSN"), "CHATSTREAM_TEST_DSN is not set")
local schema = "tsan_" .. os.time() % 100000
local w = assert(cs.open({ dsn = dsn, schema = schema, poll_interval = 0 }))
assert(w:migrate())
local r = assert(cs.open({ dsn = dsn, schema = schema, poll_interval = 0 }))
local chat = assert(w:create_chat({ owner = "a" }))
local sub = assert(r:subscribe(chat))
local f = assert(io.open(assert(os.getenv("TSAN_PIDFILE")), "w"))
f:write(r:listener_pid(), "\n", schema, "\n")
f:close()
local body = string.rep("z", 2000)
local want = {}
for i = 1, 3000 do
  want[i] = assert(w:append(chat, { role = "user", content = body }))[1]
  if i == 1500 then
    cs.sleep(1.5) -- the listener backend is killed meanwhile
  end
end
local got, deadline = {}, cs.now() + 30
while #got < #want and cs.now() < deadline do
  local ev = sub:next(0.2)
  if ev and ev.kind == "message" then
    got[#got + 1] = ev.id
  end
end
for i = 1, #want do
  assert(got[i] == want[i], ("message %d: got %s, want %d"):format(i, tostring(got[i]), want[i]))
end
assert(#got == #want, ("got %d of %d"):format(#got, #want))
assert(r:stats().reconnects >= 1, "the listener was not killed")
print(("tsan_listener: %d delivered once, in order; reconnects %d, resyncs %d"):format(#got,
  r:stats().reconnects, r:stats().resyncs))
sub:close()
r:close()
w:close()
