-- examples/idle.lua - what an idle subscriber costs the writers: a writer appends
-- as fast as it can, alone, then while another store has subscribed to every
-- chat and makes no call at all (an agent waiting on a model); side by side,
-- alternating (alone, idle, alone, idle, ..., alone) after a warm-up run, each
-- idle run compared with the mean of the two alone runs around it. After each
-- run the idle store's listener backend is inspected: its wait state, whether
-- it holds a snapshot, and the cluster's notification queue usage. Then the
-- idle store reads what it missed.
--
-- A second table says where the CPU went in each run (from /proc/PID/schedstat,
-- milliseconds on a CPU): the writer's thread, the listener threads of this
-- process (the idle store's and the writer's own), the writer's server backend,
-- the idle store's listener backend, the rest of PostgreSQL, and the whole
-- machine less all of that ("foreign": other work on the same cores).
--
-- --with adds other kinds of listener: "proc", the idle store in a process of
-- its own (this script with --child); and, none of them chatstream, a plain libpq
-- program (compiled here with cc -lpq) that LISTENs on every chat and reads in
-- a tight loop (poll, PQconsumeInput, PQnotifies; "libpq"), the same with a
-- nap after each drain ("nap", --nap microseconds), or one that LISTENs on a
-- channel nobody notifies ("deaf": its backend is still signalled and reads the
-- queue at every commit, but sends nothing). What those cost the writer is
-- PostgreSQL's own price of a listener.
--
--   CHATSTREAM_DSN=postgresql://... lua5.4 examples/idle.lua [--seconds T] [--chats C]
--       [--bytes B] [--runs N] [--with idle,proc,libpq,nap,deaf] [--nap US]
--
-- Last, per kind of run, the medians: the ratio to the alone runs around it
-- (with quartiles and range, and over the quiet runs alone), and what each
-- append cost in microseconds: wall time, the writer, its backend, the idle
-- store's listener thread, the listener's backend, a listening process.
local chatstream = require("chatstream")

local DSN = os.getenv("CHATSTREAM_DSN")
local SCHEMA = os.getenv("CHATSTREAM_SCHEMA")

local function shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- The tools it runs are not built for a sanitizer's preload (a run of the
-- specs under ASan has it in the environment): they run without it.
local NOPRELOAD = "env -u LD_PRELOAD "

local function sh(cmd)
  local f = assert(io.popen(NOPRELOAD .. cmd))
  local s = f:read("a")
  f:close()
  return (s:gsub("%s+$", ""))
end

local function psql(sql)
  return sh(("psql -X -tA -F '|' %s -c %s 2>&1"):format(shq(DSN), shq(sql)))
end

-- ---- CPU accounting ---------------------------------------------------------

local function slurp(path)
  local f = io.open(path)
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  return s
end

local MYPID = math.tointeger(tonumber(slurp("/proc/self/stat"):match("^(%d+)")))

-- Nanoseconds on a CPU of a process or thread (0 if it is gone).
local function oncpu(path)
  local s = slurp(path .. "/schedstat")
  return s and math.tointeger(tonumber(s:match("^(%d+)"))) or 0
end

-- The same over every thread of a process.
local function proc_oncpu(pid)
  local ns = 0
  for tid in sh("ls /proc/" .. pid .. "/task 2>/dev/null"):gmatch("%d+") do
    ns = ns + oncpu(("/proc/%d/task/%s"):format(pid, tid))
  end
  return ns
end

local function postgres_pids()
  local pids = {}
  for pid in sh("pgrep -x postgres"):gmatch("%d+") do
    pids[#pids + 1] = math.tointeger(tonumber(pid))
  end
  return pids
end

-- The machine's busy time, nanoseconds (from /proc/stat's jiffies).
local function machine_busy()
  local f = slurp("/proc/stat"):match("^cpu%s+([^\n]+)")
  local t, i = {}, 0
  for v in f:gmatch("%d+") do
    t[#t + 1] = tonumber(v)
  end
  for k, v in ipairs(t) do
    if k ~= 4 and k ~= 5 and k <= 8 then -- not idle, not iowait, no guest
      i = i + v
    end
  end
  return i * 1e7 -- USER_HZ = 100
end

-- A snapshot: this process's threads, every postgres process, the machine.
local function cpu_snapshot()
  local snap = { task = {}, pg = {}, busy = machine_busy() }
  for tid in sh("ls /proc/" .. MYPID .. "/task"):gmatch("%d+") do
    snap.task[math.tointeger(tonumber(tid))] = oncpu(("/proc/%d/task/%s"):format(MYPID, tid))
  end
  for _, pid in ipairs(postgres_pids()) do
    snap.pg[pid] = oncpu("/proc/" .. pid)
  end
  return snap
end

-- Milliseconds per part between two snapshots; roles names pids.
local function cpu_delta(a, b, roles)
  local d = { writer = 0, threads = 0, wbackend = 0, lbackend = 0, control = 0, pg = 0 }
  for tid, ns in pairs(b.task) do
    local k = tid == MYPID and "writer" or "threads"
    d[k] = d[k] + (ns - (a.task[tid] or 0))
  end
  for pid, ns in pairs(b.pg) do
    local k = roles[pid] or "pg"
    d[k] = d[k] + (ns - (a.pg[pid] or 0))
  end
  if roles.control_pid then
    d.control = roles.control_ns or 0
  end
  d.busy = b.busy - a.busy
  for k, v in pairs(d) do
    d[k] = v / 1e6
  end
  return d
end

-- ---- the control listener: libpq, no chatstream ------------------------------

local CONTROL_C = [[
#include <libpq-fe.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }
int main(int argc, char **argv)
{
    PGconn *c = PQconnectdb(argv[1]);
    if (PQstatus(c) != CONNECTION_OK) { fprintf(stderr, "%s", PQerrorMessage(c)); return 1; }
    long lazy_us = atol(argv[2]); /* 0: a tight loop; else sleep this long after each drain */
    for (int i = 3; i < argc; i++) {
        char sql[256];
        snprintf(sql, sizeof sql, "LISTEN \"%s\"", argv[i]);
        PQclear(PQexec(c, sql));
    }
    PGresult *r = PQexec(c, "SELECT pg_backend_pid()");
    printf("%s\n", PQgetvalue(r, 0, 0));
    fflush(stdout);
    PQclear(r);
    signal(SIGTERM, on_term);
    struct pollfd p = {.fd = PQsocket(c), .events = POLLIN};
    while (!stop) {
        if (poll(&p, 1, 100) <= 0)
            continue;
        if (!PQconsumeInput(c))
            break;
        PGnotify *e;
        while ((e = PQnotifies(c)))
            PQfreemem(e);
        if (lazy_us > 0) {
            struct timespec ts = {0, lazy_us * 1000};
            nanosleep(&ts, NULL);
        }
    }
    PQfinish(c);
    return 0;
}
]]

local function build_control()
  local dir = sh("mktemp -d")
  local f = assert(io.open(dir .. "/control.c", "w"))
  f:write(CONTROL_C)
  f:close()
  local inc = sh("pg_config --includedir 2>/dev/null || echo /usr/include/postgresql")
  assert(os.execute((NOPRELOAD .. "cc -O2 -o %s/control %s/control.c -I%s -lpq"):format(dir, dir, shq(inc))),
    "idle.lua: cannot build the control listener (cc, libpq-dev)")
  return dir .. "/control", dir
end

-- Starts the control listener on channels; its pid, its backend's pid.
local function start_control(prog, channels, lazy_us)
  local args = { lazy_us }
  for i, ch in ipairs(channels) do
    args[i + 1] = shq(ch)
  end
  local cmd = (NOPRELOAD .. "sh -c 'echo $$; exec \"$0\" \"$@\"' %s %s %s"):format(shq(prog), shq(DSN),
    table.concat(args, " "))
  local f = assert(io.popen(cmd))
  local pid = math.tointeger(tonumber(f:read("l")))
  local backend = math.tointeger(tonumber(f:read("l")))
  return { f = f, pid = pid, backend = backend }
end

-- ---- an idle subscriber in a process of its own ------------------------------

local function subscribe_all(reader, chats)
  local subs = {}
  for c, chat in ipairs(chats) do
    subs[c] = assert(reader:subscribe(chat, { after = assert(reader:chat(chat)).last_message_id }))
    for _ in subs[c]:events(0) do end -- the snapshot: the status only
  end
  return subs
end

-- The idle store wakes and reads what it missed: how many messages.
local function catch_up(reader, subs, n)
  local got, deadline = 0, chatstream.now() + 60
  while got < n and chatstream.now() < deadline do
    for _, sub in ipairs(subs) do
      for ev in sub:events(0) do
        got = got + (ev.kind == "message" and 1 or 0)
      end
    end
    reader:step(0.05)
  end
  return got
end

-- idle.lua --child FIFO CHAT...: subscribes, prints its listener's pid, makes
-- no call until a count arrives on FIFO, then catches up and prints what it got.
local function child(fifo, ids)
  local reader = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
  local subs = subscribe_all(reader, ids)
  io.write(reader:listener_pid(), "\n")
  io.flush()
  local f = assert(io.open(fifo))
  local n = math.tointeger(tonumber(f:read("l")))
  f:close()
  io.write(catch_up(reader, subs, n), "\n")
  io.flush()
  reader:close()
end

local function start_child(chats)
  local dir = sh("mktemp -d")
  local fifo = dir .. "/go"
  assert(os.execute(NOPRELOAD .. "mkfifo " .. shq(fifo)))
  local ids = {}
  for i, chat in ipairs(chats) do
    ids[i] = shq(chat)
  end
  local cmd = ("sh -c 'echo $$; exec \"$0\" \"$@\"' %s %s --child %s %s"):format(shq(arg[-1]), shq(arg[0]),
    shq(fifo), table.concat(ids, " "))
  local f = assert(io.popen(cmd))
  local pid = math.tointeger(tonumber(f:read("l")))
  local backend = math.tointeger(tonumber(f:read("l")))
  return { f = f, pid = pid, backend = backend, fifo = fifo, dir = dir }
end

-- Tells the child how many to expect; what it got.
local function finish_child(ch, n)
  local w = assert(io.open(ch.fifo, "w"))
  w:write(n, "\n")
  w:close()
  local got = ch.f:read("l")
  ch.f:close()
  os.execute(NOPRELOAD .. "rm -rf " .. shq(ch.dir))
  return math.tointeger(tonumber(got)) or 0
end

local function stop_control(ctl)
  os.execute(NOPRELOAD .. "kill " .. ctl.pid)
  ctl.f:close()
end

-- ---- the runs ---------------------------------------------------------------

local function main()
  if not DSN then
    io.stderr:write("idle.lua: set CHATSTREAM_DSN (a PostgreSQL server)\n")
    os.exit(2)
  end
  if arg[1] == "--child" then
    local ids = {}
    for k = 3, #arg do
      ids[#ids + 1] = math.tointeger(tonumber(arg[k]))
    end
    return child(arg[2], ids)
  end
  local o = { seconds = 3, chats = 10, bytes = 1000, runs = 2, with = "idle", nap = 1000 }
  local usage = "usage: idle.lua [--seconds T] [--chats C] [--bytes B] [--runs N] [--with idle,proc,libpq,nap,deaf]"
    .. " [--nap US]\n"
  local i = 1
  while arg[i] do
    local k = arg[i]:match("^%-%-(%w+)$")
    if not k or o[k] == nil or not arg[i + 1] then
      io.stderr:write(usage)
      os.exit(2)
    end
    if k == "with" then
      o.with = arg[i + 1]
      i = i + 2
      goto next
    end
    o[k] = (k == "seconds" and tonumber(arg[i + 1])) or math.tointeger(tonumber(arg[i + 1])) or error("bad --" .. k)
    i = i + 2
    ::next::
  end
  local with = {}
  for kind in o.with:gmatch("[^,]+") do
    if kind ~= "idle" and kind ~= "proc" and kind ~= "libpq" and kind ~= "nap" and kind ~= "deaf" then
      io.stderr:write(usage)
      os.exit(2)
    end
    with[#with + 1] = kind
  end
  local w = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
  assert(w:migrate())
  local chats = {}
  for c = 1, o.chats do
    chats[c] = assert(w:create_chat({ owner = "bench" }))
  end
  local prefix = (SCHEMA and SCHEMA ~= "" and SCHEMA ~= "chatstream") and (SCHEMA .. ":chat:") or "chat:"
  local channels = {}
  for c, chat in ipairs(chats) do
    channels[c] = prefix .. chat
  end
  local control_prog, control_dir
  if o.with:find("libpq") or o.with:find("nap") or o.with:find("deaf") then
    control_prog, control_dir = build_control()
  end
  local body = string.rep("x", o.bytes)
  local n0 = 0
  local function append_for(seconds)
    local n, t0 = 0, chatstream.now()
    while chatstream.now() - t0 < seconds do
      n = n + 1
      n0 = n0 + 1
      assert(w:append(chats[n0 % #chats + 1], { role = "user", content = body }))
    end
    return n, n / (chatstream.now() - t0)
  end
  append_for(1) -- warm-up: caches, prepared statements, the backend
  local wbackend = math.tointeger(tonumber(psql(("SELECT pid FROM pg_stat_activity WHERE query LIKE "
    .. "'%%pg_notify($6::text%%' AND pid <> %d ORDER BY backend_start LIMIT 1"):format(w:listener_pid()))))
  print(("idle subscriber: 1 writer, %d chats, %d-byte messages, %g s per run"):format(o.chats, o.bytes, o.seconds))
  local kinds = {}
  for _ = 1, o.runs do
    for _, kind in ipairs(with) do
      kinds[#kinds + 1] = "alone"
      kinds[#kinds + 1] = kind
    end
  end
  kinds[#kinds + 1] = "alone"
  local names = { alone = "alone", idle = "with an idle subscriber", proc = "idle, another process",
    libpq = "libpq, tight loop", nap = ("libpq, %d us naps"):format(o.nap), deaf = "libpq, other channel" }
  local rows = {}
  for _, kind in ipairs(kinds) do
    local reader, subs, pid, ctl, ch = nil, {}, nil, nil, nil
    if kind == "idle" then
      reader = assert(chatstream.open({ dsn = DSN, schema = SCHEMA }))
      subs = subscribe_all(reader, chats)
      pid = reader:listener_pid()
    elseif kind == "proc" then
      ch = start_child(chats)
      pid = ch.backend
    elseif kind ~= "alone" then
      ctl = start_control(control_prog, kind == "deaf" and { "chatstream_idle_nobody" } or channels,
        kind == "nap" and o.nap or 0)
      pid = ctl.backend
    end
    local other = ctl or ch -- a listening process of its own
    local roles = { [wbackend] = "wbackend" }
    if pid then
      roles[pid] = "lbackend"
    end
    local other_ns0 = other and proc_oncpu(other.pid) or 0
    local s0 = cpu_snapshot()
    local n, rate = append_for(o.seconds)
    local s1 = cpu_snapshot()
    if other then
      roles.control_pid = other.pid
      roles.control_ns = proc_oncpu(other.pid) - other_ns0
    end
    local row = { kind = kind, rate = rate, cpu = cpu_delta(s0, s1, roles), wait = "-", xmin = "-",
      usage = psql("SELECT pg_notification_queue_usage()"), caught = "-" }
    if pid then
      local st = psql(("SELECT coalesce(wait_event, ''), backend_xmin IS NOT NULL FROM pg_stat_activity "
        .. "WHERE pid = %d"):format(pid))
      row.wait, row.xmin = st:match("^([^|]*)|([tf])$")
    end
    if reader then
      row.caught = ("%d/%d"):format(catch_up(reader, subs, n), n)
      reader:close()
    elseif ch then
      row.caught = ("%d/%d"):format(finish_child(ch, n), n)
    end
    if ctl then
      stop_control(ctl)
    end
    rows[#rows + 1] = row
  end
  -- each run with a listener against the mean of the alone runs around it
  for k, row in ipairs(rows) do
    if row.kind ~= "alone" then
      local a, b = rows[k - 1], rows[k + 1]
      row.base = ((a and a.rate or b.rate) + (b and b.rate or a.rate)) / 2
    end
  end
  print(("%-24s %10s %10s %14s %11s %12s %12s"):format("run", "appends/s", "vs alone", "backend wait",
    "holds xmin", "queue usage", "caught up"))
  for _, row in ipairs(rows) do
    print(("%-24s %10.0f %10s %14s %11s %12s %12s"):format(names[row.kind], row.rate,
      row.base and ("%.1f%%"):format(100 * row.rate / row.base) or "-", row.wait ~= "" and row.wait or "(none)",
      row.xmin == "t" and "yes" or row.xmin == "f" and "no" or row.xmin, row.usage, row.caught))
  end
  print()
  print(("CPU per run, ms on a CPU (%g s runs):"):format(o.seconds))
  print(("%-24s %8s %8s %10s %10s %10s %8s %8s %9s"):format("run", "writer", "threads", "w backend",
    "l backend", "l process", "other pg", "foreign", "us/append"))
  local ctl_kind = { proc = true, libpq = true, nap = true, deaf = true }
  for _, row in ipairs(rows) do
    local c = row.cpu
    local mine = c.writer + c.threads + c.wbackend + c.lbackend + c.control
    print(("%-24s %8.0f %8.0f %10.0f %10s %10s %8.0f %8.0f %9.1f"):format(names[row.kind], c.writer, c.threads,
      c.wbackend, row.kind == "alone" and "-" or ("%.0f"):format(c.lbackend),
      ctl_kind[row.kind] and ("%.0f"):format(c.control) or "-", c.pg, math.max(0, c.busy - mine - c.pg),
      1000 * mine / (row.rate * o.seconds)))
  end
  -- by kind: the ratios (median, quartiles, range; and over the quiet runs:
  -- foreign work under a tenth of a core in the run and the alone runs around
  -- it), and the medians of what an append cost, microseconds
  local function foreign(row)
    local c = row.cpu
    return (c.busy - c.writer - c.threads - c.wbackend - c.lbackend - c.control - c.pg) / (1000 * o.seconds)
  end
  local function sorted(t)
    local r = { table.unpack(t) }
    table.sort(r)
    return r
  end
  local function median(t)
    local r = sorted(t)
    return #r % 2 == 1 and r[(#r + 1) // 2] or (r[#r // 2] + r[#r // 2 + 1]) / 2
  end
  local function rank(r, f) -- nearest rank, r sorted
    return r[math.max(1, math.ceil(f * #r))]
  end
  print()
  local cols = { { "appends/s" }, { "wall", 1 }, { "writer", "writer" }, { "w backend", "wbackend" },
    { "l thread", "threads" }, { "l backend", "lbackend" }, { "l process", "control" } }
  local head = ("%-24s"):format("medians, us per append")
  for k = 2, #cols do
    head = head .. ("%11s"):format(cols[k][1])
  end
  print(head .. ("%11s"):format("appends/s"))
  for _, kind in ipairs({ "alone", table.unpack(with) }) do
    local per = {}
    for k = 1, #cols do
      per[k] = {}
    end
    for _, row in ipairs(rows) do
      if row.kind == kind then
        local n = row.rate * o.seconds
        per[1][#per[1] + 1] = row.rate
        per[2][#per[2] + 1] = 1e6 / row.rate
        for k = 3, #cols do
          local v = row.cpu[cols[k][2]]
          if kind == "alone" and (k == 5 or k == 6) then
            v = 0 -- no idle store: the threads are the writer's own idle listener
          end
          per[k][#per[k] + 1] = 1000 * v / n
        end
      end
    end
    local line = ("%-24s"):format(names[kind])
    for k = 2, #cols do
      line = line .. ("%11.1f"):format(median(per[k]))
    end
    print(line .. ("%11.0f"):format(median(per[1])))
  end
  print()
  for _, kind in ipairs(with) do
    local all, quiet = {}, {}
    for k, row in ipairs(rows) do
      if row.kind == kind then
        local ratio = 100 * row.rate / row.base
        all[#all + 1] = ratio
        if math.max(foreign(rows[k - 1]), foreign(row), foreign(rows[k + 1])) < 0.1 then
          quiet[#quiet + 1] = ratio
        end
      end
    end
    local r = sorted(all)
    local line = ("%-24s vs alone: median %.1f%% (quartiles %.1f-%.1f%%, range %.1f-%.1f%%, %d runs)"):format(
      names[kind], median(all), rank(r, 0.25), rank(r, 0.75), r[1], r[#r], #r)
    if #quiet > 0 then
      line = line .. ("; quiet runs: median %.1f%% over %d"):format(median(quiet), #quiet)
    end
    print(line)
  end
  if control_dir then
    os.execute(NOPRELOAD .. "rm -rf " .. shq(control_dir))
  end
  w:close()
end

main()
