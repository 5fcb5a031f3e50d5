-- examples/bench.lua - end to end on PostgreSQL: writers in K processes,
-- readers in M processes with S subscriptions per chat, for every strategy;
-- and, in the same run on the same server, the ceiling: pgbench doing the
-- same insert + pg_notify transactions.
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/bench.lua
--       [--writers K] [--readers M] [--subs S] [--chats C] [--seconds T]
--       [--strategies watermark,unordered,rescan,last_id] [--batch MS] [--shared] [--plain]
--       [--pipeline N]
--       (watermark is ordered, its default; unordered is watermark with ordered = false)
--       [--smoke]
--
-- Per strategy it prints: messages written and delivered per second (each
-- message once per subscription counted in "deliveries/s"), publish-to-
-- delivery latency p50/p99/max (the writer puts its wall clock in the
-- message), DB queries per delivered message (store:stats() of the readers),
-- and connections per reader process (pg_stat_activity). Then pgbench's
-- transactions per second and the ratio of our write+deliver throughput to
-- it; the ceiling again while M watermark reader processes deliver what
-- pgbench writes (PostgreSQL's own cost of delivering notifications then on
-- both sides), and our ratio to that; and where the CPU goes: microseconds per message by role (the
-- server's backends, found in pg_stat_activity, read from /proc when the
-- server runs on this machine; "-" where a role has no process), beside
-- pgbench's per transaction. --batch MS: readers let notifications gather
-- MS milliseconds after the first (one DB pass per chat per batch; latency
-- for throughput).
-- --plain: writers publish step by step (commit, then pg_notify on its own):
-- plain hints without the message, so readers query for every one.
-- --pipeline N: writers keep N appends in flight on their connection
-- (store:append_many: pipeline mode, each append its own transaction).
-- --shared: no writer processes; each reader process writes too, so writer
-- and readers share a hub (its cache).
-- --smoke: a short run (CI keeps it from rotting). Internal modes:
-- bench.lua writer|reader ... (spawned by the main process).
local chatstream = require("chatstream")

local DSN = os.getenv("CHATSTREAM_DSN")
local SCHEMA = os.getenv("CHATSTREAM_SCHEMA") or "chatstream_bench"
local LUA = os.getenv("CHATSTREAM_LUA") or "lua5.4"
local SELF = debug.getinfo(1, "S").source:sub(2)

local function shq(s)
  return "'" .. (tostring(s):gsub("'", "'\\''")) .. "'"
end

--- The wall clock, shared by the processes, to the microsecond.
local wall = chatstream.now

-- ---- CPU by role (Linux /proc; the server's backends when it is local) -----

local TICK = 100 -- USER_HZ: /proc/<pid>/stat counts CPU time in 1/100 s

local function my_pid()
  local f = io.open("/proc/self/stat")
  local pid = f and f:read("n")
  if f then
    f:close()
  end
  return pid
end

--- CPU seconds (user + system) a process has used, or nil if it is gone or
-- not on this machine.
local function proc_cpu(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then
    return nil
  end
  local line = f:read("l")
  f:close()
  -- after the command name in parentheses: state and 10 fields, then utime stime
  local rest = line and line:match("%) (.*)$")
  if not rest then
    return nil
  end
  local fields = {}
  for v in rest:gmatch("%S+") do
    fields[#fields + 1] = v
  end
  return (tonumber(fields[12]) + tonumber(fields[13])) / TICK
end

--- CPU seconds the whole machine has used (all but idle and iowait).
local function machine_cpu()
  local f = assert(io.open("/proc/stat"))
  local line = f:read("l")
  f:close()
  local v = {}
  for n in line:gmatch("%d+") do
    v[#v + 1] = tonumber(n)
  end
  return (v[1] + v[2] + v[3] + v[6] + v[7] + v[8]) / TICK
end

local function dsn_with(app)
  local sep = DSN:find("?", 1, true) and "&" or "?"
  if DSN:match("^postgres") then
    return DSN .. sep .. "application_name=" .. app
  end
  return DSN .. " application_name=" .. app
end

-- ---- writer -------------------------------------------------------------------

local function writer(id, chats, seconds, plain, pipeline)
  local store = assert(chatstream.open({ dsn = dsn_with("csbench_w" .. id), schema = SCHEMA, poll_interval = 0 }))
  io.stdout:write(("pid %d\n"):format(my_pid() or -1))
  io.stdout:flush()
  local stop = wall() + seconds
  local n, c = 0, id
  while wall() < stop do
    c = c % chats + 1
    local msg = { role = "assistant", content = ("t=%.6f"):format(wall()) }
    if pipeline > 0 then
      -- several appends in flight on the connection: one round trip each
      -- batch (store:append_many, pipeline mode), each its own transaction
      local batch = { { c, msg } }
      for k = 2, pipeline do
        c = c % chats + 1
        batch[k] = { c, { role = "assistant", content = ("t=%.6f"):format(wall()) } }
      end
      local ids = store:append_many(batch)
      for k = 1, pipeline do
        assert(ids[k], "a pipelined append failed")
      end
      n = n + pipeline - 1
    elseif plain then
      -- commit, then the notification as its own statement: a plain hint,
      -- so readers query (one DB pass per chat per hub)
      local p = assert(store:prepare(c, msg))
      assert(p:commit())
      assert(p:publish())
      p:close()
    else
      assert(store:append(c, msg))
    end
    n = n + 1
  end
  print("written " .. n)
  store:close()
end

-- ---- reader -------------------------------------------------------------------

local function reader(id, chats, subs, strategy, seconds, outfile, batch, shared)
  local store = assert(chatstream.open({ dsn = dsn_with("csbench_r" .. id), schema = SCHEMA }))
  local all = {}
  for c = 1, chats do
    -- from the chat's end: earlier runs' messages are not this run's
    local after = assert(store:chat(c)).last_message_id
    for _ = 1, subs do
      -- "unordered": the watermark with ordered = false (the default is ordered)
      local sub = assert(store:subscribe(c, strategy == "unordered"
        and { strategy = "watermark", ordered = false, after = after }
        or { strategy = strategy, after = after }))
      for _ in sub:events(0) do end -- the snapshot: the status only
      all[#all + 1] = sub
    end
  end
  io.stdout:write(("ready %d\n"):format(my_pid() or -1))
  io.stdout:flush()
  local lat, delivered, written = {}, 0, 0
  local stop = wall() + seconds
  -- --shared: this process is the writer too (its hub's cache holds what it
  -- writes), for the seconds the writers of the other mode would write
  local write_stop = stop - 1.5
  local c = id
  while wall() < stop do
    if shared and wall() < write_stop then
      c = c % chats + 1
      assert(store:append(c, { role = "assistant", content = ("t=%.6f"):format(wall()) }))
      written = written + 1
      store:step(0)
    -- With a batch time, notifications gather for that long after the first
    -- arrives: one DB pass per chat then covers them all (latency for
    -- throughput).
    elseif assert(store:step(0.05)) > 0 and batch > 0 then
      chatstream.sleep(batch)
    end
    for _, sub in ipairs(all) do
      for ev in sub:events(0) do
        if ev.kind == "message" then
          delivered = delivered + 1
          local t = tonumber(ev.content:match("^t=([%d.]+)"))
          if t then
            lat[#lat + 1] = wall() - t
          end
        end
      end
    end
  end
  local st = store:stats()
  local out = assert(io.open(outfile, "w"))
  out:write(("delivered %d queries %d written %d\n"):format(delivered, st.queries, written))
  -- a sample of latencies is enough for percentiles
  local step = math.max(1, #lat // 20000)
  for i = 1, #lat, step do
    out:write(("lat %.6f\n"):format(lat[i]))
  end
  out:close()
  for _, sub in ipairs(all) do
    sub:close()
  end
  store:close()
end

-- ---- main ---------------------------------------------------------------------

local function spawn(args)
  local q = {}
  for i, a in ipairs(args) do
    q[i] = shq(a)
  end
  return assert(io.popen(("LUA_PATH=%s LUA_CPATH=%s %s %s %s"):format(
    shq(package.path), shq(package.cpath), LUA, shq(SELF), table.concat(q, " ")), "r"))
end

local function psql(sql)
  local f = assert(io.popen(("env -u LD_PRELOAD psql -X -tA %s -c %s 2>&1"):format(shq(DSN), shq(sql))))
  local s = f:read("a")
  f:close()
  return s
end

local function percentile(sorted, p)
  if #sorted == 0 then
    return 0
  end
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

--- The chatstream processes and server backends of a run, by role:
-- roles = { name = { pids } }. Backends are found in pg_stat_activity by
-- application_name (csbench_w*, csbench_r*: a reader's listener is the one
-- whose last statement is a LISTEN).
local function backend_roles(roles, app_like)
  local out = psql(("SELECT pid, application_name, left(query, 9) FROM pg_stat_activity "
    .. "WHERE application_name LIKE '%s'"):format(app_like))
  for pid, app, q in out:gmatch("(%d+)|([^|\n]*)|([^\n]*)") do
    local role = app:match("^csbench_w") and "writer backends"
      or app:match("^csbench_r") and (q:match("LISTEN") and "listener backends" or "reader query backends")
      or "pgbench backends"
    roles[role] = roles[role] or {}
    table.insert(roles[role], tonumber(pid))
  end
end

--- CPU seconds per role now, and the machine's.
local function sample_cpu(roles)
  local t = { machine = machine_cpu() }
  for role, pids in pairs(roles) do
    local sum = 0
    for _, pid in ipairs(pids) do
      sum = sum + (proc_cpu(pid) or 0)
    end
    t[role] = sum
  end
  return t
end

--- CPU per role between two samples: { role = seconds }, "other" the rest.
local function cpu_between(a, b)
  local d, known = {}, 0
  for role, v in pairs(b) do
    if role ~= "machine" then
      d[role] = v - (a[role] or v)
      known = known + d[role]
    end
  end
  d.other = math.max(0, (b.machine - a.machine) - known)
  return d
end

local function pgbench(writers, chats, seconds, roles)
  local script = os.tmpname()
  local f = assert(io.open(script, "w"))
  -- the same statement as store:append, prepared and in autocommit as ours:
  -- lock the chat, insert with the chat's last message as prev_id, move it,
  -- and queue the notification, which carries the message, for the commit
  -- (strings built with chr(58): pgbench would take ":chat" inside a literal
  -- for a variable)
  local stmt = table.concat({
    "WITH c AS (SELECT id, last_message_id FROM S.chats WHERE id = :chat FOR UPDATE),",
    "m AS (INSERT INTO S.messages (chat_id, role, content, prev_id, tool)",
    "SELECT c.id, 'assistant', 't=1764000000.000000', c.last_message_id, '' FROM c RETURNING id, prev_id),",
    "u AS (UPDATE S.chats SET last_message_id = m.id, updated_at = now() FROM m WHERE S.chats.id = :chat)",
    "SELECT id, prev_id, pg_notify(concat_ws(chr(58), 'S', 'chat', CAST(:chat AS text)),",
    "concat_ws(chr(58), '1', 'M', prev_id, id, 'assistant', '0', 't=1764000000.000000')) FROM m;",
  }, " "):gsub("S%.", SCHEMA .. "."):gsub("'S'", "'" .. SCHEMA .. "'")
  f:write(("\\set chat random(1, %d)\n%s\n"):format(chats, stmt))
  f:close()
  local secs = math.max(1, math.floor(seconds))
  local p = assert(io.popen(("env -u LD_PRELOAD pgbench -n -f %s -c %d -j %d -T %d -M prepared %s 2>&1")
    :format(shq(script), writers, writers, secs, shq(DSN))))
  -- CPU by role over the middle of the run
  chatstream.sleep(math.min(0.5, secs / 4))
  roles = roles or {}
  backend_roles(roles, "pgbench")
  local procs = io.popen("env -u LD_PRELOAD pgrep -x pgbench")
  roles["pgbench process"] = {}
  for pid in procs:read("a"):gmatch("%d+") do
    table.insert(roles["pgbench process"], tonumber(pid))
  end
  procs:close()
  local t0, c0 = wall(), sample_cpu(roles)
  chatstream.sleep(math.max(0.2, secs - 1))
  local window, cpu = wall() - t0, cpu_between(c0, sample_cpu(roles))
  local out = p:read("a")
  p:close()
  os.remove(script)
  local tps = tonumber(out:match("tps = ([%d.]+)"))
  if not tps then
    error("pgbench failed:\n" .. out)
  end
  return tps, cpu, window
end

--- M reader processes of `strategy`, subscribed and ready: their pipes,
-- result files, and roles for the CPU table.
local function start_readers(o, strategy)
  local readers, files = {}, {}
  for r = 1, o.readers do
    files[r] = os.tmpname()
    readers[r] = spawn({ "reader", tostring(r), tostring(o.chats), tostring(o.subs), strategy,
      tostring(o.seconds + 1.5), files[r], tostring(o.batch), o.shared and "shared" or "" })
  end
  local roles = { ["reader processes"] = {} }
  for r = 1, o.readers do
    local pid = tonumber((readers[r]:read("l") or ""):match("^ready (%-?%d+)$"))
    assert(pid, "a reader did not start")
    table.insert(roles["reader processes"], pid)
  end
  return readers, files, roles
end

local function main()
  if not DSN then
    io.stderr:write("bench.lua: set CHATSTREAM_DSN (a PostgreSQL server)\n")
    os.exit(2)
  end
  local o = { writers = 2, readers = 2, subs = 1, chats = 10, seconds = 5,
    strategies = "watermark,unordered,rescan,last_id", batch = 0, shared = false, plain = false, pipeline = 0 }
  local i = 1
  while arg[i] do
    local k, v = arg[i]:match("^%-%-(%w+)$"), arg[i + 1]
    if k == "smoke" then
      o.seconds, o.chats, o.smoke = 1, 3, true
      i = i + 1
    elseif k == "shared" or k == "plain" then
      o[k] = true
      i = i + 1
    elseif k and o[k] ~= nil and v then
      o[k] = k == "strategies" and v or math.tointeger(tonumber(v)) or error("bad --" .. k)
      if k == "batch" then
        o.batch = o.batch / 1000 -- given in milliseconds
      end
      i = i + 2
    else
      io.stderr:write("usage: bench.lua [--writers K] [--readers M] [--subs S] [--chats C] "
        .. "[--seconds T] [--strategies a,b] [--batch MS] [--shared] [--plain] [--pipeline N] [--smoke]\n")
      os.exit(2)
    end
  end
  local store = assert(chatstream.open({ dsn = DSN, schema = SCHEMA, poll_interval = 0 }))
  assert(store:migrate())
  -- chats 1..C in a fresh schema: empty it first
  psql(("TRUNCATE %s.chats, %s.messages, %s.queued_messages RESTART IDENTITY CASCADE"):format(SCHEMA, SCHEMA, SCHEMA))
  for _ = 1, o.chats do
    assert(store:create_chat({ owner = "bench" }))
  end
  print(("end-to-end: %s, %d chats, %d subscription(s) per chat per reader, %d s each")
    :format(o.shared and ("%d processes writing and reading (shared hub)"):format(o.readers)
      or ("%d writer and %d reader processes"):format(o.writers, o.readers), o.chats, o.subs, o.seconds))
  print(("%-10s %9s %12s %9s %9s %9s %11s %9s"):format("strategy", "msgs/s", "deliveries/s", "p50 ms",
    "p99 ms", "max ms", "queries/msg", "conns/proc"))
  local rows = {}
  for strategy in o.strategies:gmatch("[^,]+") do
    local readers, files, roles = start_readers(o, strategy)
    roles["writer processes"] = {}
    local conns = tonumber(psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'csbench_r%'"))
    local writers = {}
    local started = wall()
    for w = 1, o.shared and 0 or o.writers do
      writers[w] = spawn({ "writer", tostring(w), tostring(o.chats), tostring(o.seconds), o.plain and "plain" or "",
        tostring(o.pipeline) })
      local pid = tonumber((writers[w]:read("l") or ""):match("^pid (%-?%d+)$"))
      assert(pid, "a writer did not start")
      table.insert(roles["writer processes"], pid)
    end
    -- CPU by role over the run's middle (every process and backend alive)
    backend_roles(roles, "csbench_%")
    local t0, c0 = wall(), sample_cpu(roles)
    chatstream.sleep(math.max(0.1, started + o.seconds - 0.3 - wall()))
    local window, cpu = wall() - t0, cpu_between(c0, sample_cpu(roles))
    local written = 0
    for w = 1, #writers do
      written = written + (tonumber(writers[w]:read("a"):match("written (%d+)")) or 0)
      writers[w]:close()
    end
    local delivered, queries, lat = 0, 0, {}
    for r = 1, o.readers do
      readers[r]:close()
      for l in io.lines(files[r]) do
        local d, q, wr = l:match("^delivered (%d+) queries (%d+) written (%d+)")
        if d then
          delivered, queries = delivered + tonumber(d), queries + tonumber(q)
          written = written + tonumber(wr)
        end
        local t = l:match("^lat ([%d.%-]+)")
        if t then
          lat[#lat + 1] = tonumber(t)
        end
      end
      os.remove(files[r])
    end
    table.sort(lat)
    local msgs = written / o.seconds
    local row = {
      strategy = strategy, msgs = msgs, deliveries = delivered / o.seconds,
      p50 = percentile(lat, 0.5) * 1000, p99 = percentile(lat, 0.99) * 1000, max = (lat[#lat] or 0) * 1000,
      qpm = delivered > 0 and queries / delivered or 0, conns = conns / o.readers,
      complete = delivered == written * o.subs * o.readers,
      cpu = cpu, window = window,
    }
    rows[#rows + 1] = row
    print(("%-10s %9.0f %12.0f %9.2f %9.2f %9.2f %11.3f %9.1f%s"):format(row.strategy, row.msgs, row.deliveries,
      row.p50, row.p99, row.max, row.qpm, row.conns,
      row.complete and "" or (" (delivered %d of %d)"):format(delivered, written * o.subs * o.readers)))
  end
  local tps, pcpu, pwindow = pgbench(o.writers, o.chats, o.seconds)
  print(("ceiling: pgbench, the same insert + pg_notify transactions, %d clients: %.0f tps"):format(o.writers, tps))
  for _, r in ipairs(rows) do
    print(("  %-10s %5.1f%% of the ceiling"):format(r.strategy, 100 * r.msgs / tps))
  end
  -- The same again while M watermark reader processes listen and deliver
  -- what pgbench writes: PostgreSQL's cost of delivering notifications
  -- (listener backends, waking them) is then on both sides.
  local dtps, dcpu, dwindow
  if not o.shared and o.readers > 0 then
    local readers, files, roles = start_readers(o, "watermark")
    backend_roles(roles, "csbench_r%")
    dtps, dcpu, dwindow = pgbench(o.writers, o.chats, o.seconds, roles)
    for r = 1, o.readers do
      readers[r]:close()
      os.remove(files[r])
    end
    print(("ceiling with delivery: pgbench while %d watermark reader processes deliver: %.0f tps")
      :format(o.readers, dtps))
    for _, r in ipairs(rows) do
      print(("  %-10s %5.1f%% of it"):format(r.strategy, 100 * r.msgs / dtps))
    end
  end
  -- Where the CPU goes: microseconds per message written (per transaction
  -- for pgbench), measured over the middle of each run.
  local cols = {}
  for _, r in ipairs(rows) do
    cols[#cols + 1] = { name = r.strategy, cpu = r.cpu, n = r.msgs * r.window }
  end
  cols[#cols + 1] = { name = "pgbench", cpu = pcpu, n = tps * pwindow }
  if dtps then
    cols[#cols + 1] = { name = "pgb+readers", cpu = dcpu, n = dtps * dwindow }
  end
  local order = { "writer backends", "listener backends", "reader query backends", "writer processes",
    "reader processes", "pgbench backends", "pgbench process", "other" }
  local head = { ("%-22s"):format("CPU us per message") }
  for _, c in ipairs(cols) do
    head[#head + 1] = ("%11s"):format(c.name)
  end
  print(table.concat(head, " "))
  local totals = {}
  for _, role in ipairs(order) do
    local line, any = { ("%-22s"):format(role) }, false
    for k, c in ipairs(cols) do
      local v = c.cpu[role]
      any = any or v ~= nil
      line[#line + 1] = v and c.n > 0 and ("%11.1f"):format(v * 1e6 / c.n) or ("%11s"):format("-")
      totals[k] = (totals[k] or 0) + (v or 0)
    end
    if any then
      print(table.concat(line, " "))
    end
  end
  local line = { ("%-22s"):format("total") }
  for k, c in ipairs(cols) do
    line[#line + 1] = c.n > 0 and ("%11.1f"):format(totals[k] * 1e6 / c.n) or ("%11s"):format("-")
  end
  print(table.concat(line, " "))
  print("(other: the rest of the machine's CPU in the same window: server processes such as the WAL writer, "
    .. "the kernel's own work, anything else running)")
  store:close()
end

local mode = arg[1]
if mode == "writer" then
  writer(tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]), arg[5] == "plain", tonumber(arg[6]) or 0)
elseif mode == "reader" then
  reader(tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]), arg[5], tonumber(arg[6]), arg[7],
    tonumber(arg[8]) or 0, arg[9] == "shared")
else
  main()
end
