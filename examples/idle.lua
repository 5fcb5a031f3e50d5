-- examples/idle.lua - what an idle subscriber costs the writers: a writer appends
-- as fast as it can, alone, then while another store has subscribed to every
-- chat and makes no call at all (an agent waiting on a model); side by side,
-- twice each, alternating. After each run the idle store's listener backend is
-- inspected: its wait state, whether it holds a snapshot, and the cluster's
-- notification queue usage. Then the idle store reads what it missed.
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/idle.lua [--seconds T] [--chats C] [--bytes B]
local chatstream = require("chatstream")

local DSN = os.getenv("CHATSTREAM_DSN")
local SCHEMA = os.getenv("CHATSTREAM_SCHEMA")

local function shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function psql(sql)
  local f = assert(io.popen(("env -u LD_PRELOAD psql -X -tA -F '|' %s -c %s 2>&1"):format(shq(DSN), shq(sql))))
  local s = f:read("a")
  f:close()
  return (s:gsub("%s+$", ""))
end

local function main()
  if not DSN then
    io.stderr:write("idle.lua: set CHATSTREAM_DSN (a PostgreSQL server)\n")
    os.exit(2)
  end
  local o = { seconds = 3, chats = 10, bytes = 1000 }
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write("usage: idle.lua [--seconds T] [--chats C] [--bytes B]\n")
      os.exit(2)
    end
    o[k] = math.tointeger(tonumber(arg[i + 1])) or error("bad --" .. k)
    i = i + 2
  end
  local w = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
  assert(w:migrate())
  local chats = {}
  for c = 1, o.chats do
    chats[c] = assert(w:create_chat({ owner = "bench" }))
  end
  local body = string.rep("x", o.bytes)
  print(("idle subscriber: 1 writer, %d chats, %d-byte messages, %d s per run"):format(o.chats, o.bytes, o.seconds))
  print(("%-22s %12s %10s %14s %12s %12s %10s"):format("run", "appends/s", "vs alone", "backend wait",
    "holds xmin", "queue usage", "caught up"))
  local alone
  for _, idle in ipairs({ false, true, false, true }) do
    local reader, subs, pid = nil, {}, nil
    if idle then
      reader = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
      for c, chat in ipairs(chats) do
        subs[c] = assert(reader:subscribe(chat, { after = assert(reader:chat(chat)).last_message_id }))
        for _ in subs[c]:events(0) do end -- the snapshot: the status only
      end
      pid = reader:listener_pid()
    end
    local n, t0 = 0, chatstream.now()
    while chatstream.now() - t0 < o.seconds do
      n = n + 1
      assert(w:append(chats[n % #chats + 1], { role = "user", content = body }))
    end
    local rate = n / (chatstream.now() - t0)
    alone = alone or (not idle and rate) or nil
    local wait, xmin, usage, caught = "-", "-", psql("SELECT pg_notification_queue_usage()"), "-"
    if idle then
      local row = psql(("SELECT coalesce(wait_event, ''), backend_xmin IS NOT NULL FROM pg_stat_activity "
        .. "WHERE pid = %d"):format(pid))
      wait, xmin = row:match("^([^|]*)|([tf])$")
      -- the idle store wakes and reads what it missed
      local got, deadline = 0, chatstream.now() + 60
      while got < n and chatstream.now() < deadline do
        for _, sub in ipairs(subs) do
          for ev in sub:events(0) do
            got = got + (ev.kind == "message" and 1 or 0)
          end
        end
        reader:step(0.05)
      end
      caught = ("%d/%d"):format(got, n)
      reader:close()
    end
    print(("%-22s %12.0f %9.1f%% %14s %12s %12s %10s"):format(idle and "with an idle subscriber" or "alone", rate,
      100 * rate / (alone or rate), wait ~= "" and wait or "(none)", xmin == "t" and "yes" or xmin == "f" and "no"
        or xmin, usage, caught))
  end
  w:close()
end

main()
