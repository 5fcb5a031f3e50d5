-- examples/web.lua - chats in a browser: an HTTP server that streams chats
-- live through Server-Sent Events (chatstream.web, on lua-http and
-- chatstream.cqueues), on PostgreSQL with CHATSTREAM_DSN (and
-- CHATSTREAM_SCHEMA) or the embedded store. Listens on 127.0.0.1 and
-- CHATSTREAM_WEB_PORT (default 8080; 0 picks a free port). Prints the
-- address it serves, then runs until killed.
--
--   lua5.4 examples/web.lua      (or: make web)   then open http://127.0.0.1:8080/
--
-- Options (each also an environment variable): --port N
-- (CHATSTREAM_WEB_PORT), --heartbeat S (CHATSTREAM_WEB_HEARTBEAT: seconds
-- between the event stream's heartbeat comments, default 15),
-- --max-pending B (CHATSTREAM_WEB_MAX_PENDING: bytes of events formatted
-- for a client and not yet written, default 1 MiB), --write-timeout S
-- (CHATSTREAM_WEB_WRITE_TIMEOUT: seconds a write to a client may take
-- before the client is let go, default 30).
local cs = require("chatstream.cqueues")
local web = require("chatstream.web")

local USAGE = "usage: web.lua [--port N] [--heartbeat S] [--max-pending B] [--write-timeout S]\n"

-- The options: each flag, else its environment variable, else the default.
local function options()
  local o = {
    port = { "CHATSTREAM_WEB_PORT", 8080 },
    heartbeat = { "CHATSTREAM_WEB_HEARTBEAT", web.DEFAULTS.heartbeat },
    ["max-pending"] = { "CHATSTREAM_WEB_MAX_PENDING", web.DEFAULTS.max_pending },
    ["write-timeout"] = { "CHATSTREAM_WEB_WRITE_TIMEOUT", web.DEFAULTS.write_timeout },
  }
  local given = {}
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-([%w-]+)$")
    if not k or not o[k] or not arg[i + 1] then
      io.stderr:write(USAGE)
      os.exit(2)
    end
    given[k], i = arg[i + 1], i + 2
  end
  local r = {}
  for k, d in pairs(o) do
    local v = given[k] or os.getenv(d[1])
    v = v ~= "" and v or nil
    r[k] = v and tonumber(v) or d[2]
    if v and not tonumber(v) then
      io.stderr:write(("web.lua: --%s (%s) must be a number, not %q\n"):format(k, d[1], v))
      os.exit(2)
    end
  end
  return r
end

local function main()
  local o = options()
  local dsn = os.getenv("CHATSTREAM_DSN")
  dsn = dsn ~= "" and dsn or nil
  -- share_events: the server only reads events, so each message's table
  -- (and its text) serves all its clients
  local store = assert(cs.open({ dsn = dsn, schema = dsn and os.getenv("CHATSTREAM_SCHEMA") or nil,
    share_events = true }))
  if dsn then
    assert(store:migrate())
  end
  local srv = assert(web.listen({
    store = store,
    port = o.port,
    heartbeat = o.heartbeat,
    max_pending = o["max-pending"],
    write_timeout = o["write-timeout"],
  }))
  print(("web: serving http://127.0.0.1:%d/ on the %s store"):format(srv:port(), store:kind()))
  io.stdout:flush()
  assert(srv:loop())
end

main()
