-- spec/support/procs.lua - child OS processes for the multi-process specs.
--
-- A child is `lua5.4 <script> args...`, run on the same build as the spec
-- (LUA_PATH / LUA_CPATH) and with the environment inherited as is (a
-- sanitizer build needs its ASan preload in the child too). Its stdout and
-- stderr go to temporary files; the shell around it records "pid <n>" and,
-- once it has ended, "exit <status>" in the stdout file, so the spec can poll
-- a child without blocking and kill it on a timeout.
local P = {}

P.LUA = os.getenv("CHATSTREAM_LUA") or "lua5.4"

function P.shq(s)
  return "'" .. (tostring(s):gsub("'", "'\\''")) .. "'"
end

function P.slurp(path)
  local f = io.open(path, "r")
  if not f then
    return ""
  end
  local s = f:read("a") or ""
  f:close()
  return s
end

--- Starts script with args in the background; adds it to procs.
function P.spawn(procs, script, args)
  local w = { out = os.tmpname(), err = os.tmpname(), args = args, script = script }
  local quoted = {}
  for i, a in ipairs(args) do
    quoted[i] = P.shq(a)
  end
  local cmd = string.format(
    "LUA_PATH=%s LUA_CPATH=%s %s %s %s >>%s 2>%s </dev/null & echo \"pid $!\" >>%s; wait $!; echo \"exit $?\" >>%s",
    P.shq(package.path), P.shq(package.cpath), P.LUA, P.shq(script), table.concat(quoted, " "),
    P.shq(w.out), P.shq(w.err), P.shq(w.out), P.shq(w.out))
  w.h = assert(io.popen(cmd, "r"))
  procs[#procs + 1] = w
  return w
end

--- The child's stdout so far: a table of lines.
function P.lines(w)
  local t = {}
  for l in P.slurp(w.out):gmatch("[^\n]+") do
    t[#t + 1] = l
  end
  return t
end

--- The captures of the first stdout line matching pattern, or nil.
function P.line_match(w, pattern)
  for _, l in ipairs(P.lines(w)) do
    local a, b = l:match(pattern)
    if a then
      return a, b
    end
  end
end

function P.exited(w)
  return P.line_match(w, "^exit (%d+)$") ~= nil
end

--- Waits (sleeping) until the child has exited, at most limit seconds.
function P.wait(w, limit)
  local deadline = os.time() + limit + 1
  while not P.exited(w) and os.time() <= deadline do
    os.execute("sleep 0.05")
  end
  return P.exited(w)
end

--- Reaps a child: kills it if it still runs, closes the popen handle
-- (which waits for the shell), removes the files. Returns its stdout lines,
-- stderr and exit status (nil if it had to be killed).
function P.reap(w)
  if w.reaped then
    return w.result_lines, w.result_err, w.status
  end
  if not P.exited(w) then
    local pid = P.line_match(w, "^pid (%d+)$")
    if pid then
      os.execute("kill " .. pid .. " 2>/dev/null")
    end
  end
  w.h:close()
  w.result_lines, w.result_err = P.lines(w), P.slurp(w.err)
  w.status = math.tointeger(tonumber(P.line_match(w, "^exit (%d+)$") or ""))
  os.remove(w.out)
  os.remove(w.err)
  w.reaped = true
  return w.result_lines, w.result_err, w.status
end

--- Runs fn(procs); afterwards every child in procs is reaped, even on error.
function P.with(fn)
  local procs = {}
  local ok, err = pcall(fn, procs)
  for _, w in ipairs(procs) do
    P.reap(w)
  end
  if not ok then
    error(err, 0)
  end
end

return P
