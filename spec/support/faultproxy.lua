-- spec/support/faultproxy.lua - runs build/faultproxy in front of a server for the fault specs.
--
--   local FP = require("support.faultproxy")
--   local p = FP.start("127.0.0.1", 5432)  -- p.port, p.pid, p.log (its stderr)
--   local dsn = p:dsn(base_dsn)            -- base_dsn with host 127.0.0.1, port p.port
--   p:cut()     -- the next reply to a request is lost and its connection closed
--   p:stall()   -- forward nothing until p:resume() (the same signal: a toggle)
--   p:drop()    -- close every open connection at once
--   p:stop()    -- stop it and wait until it is gone (also on __close and __gc)
--
-- The proxy runs under a shell that waits for it and appends "exit <status>"
-- to its stdout file, so stop() knows when it is gone without polling its pid.
-- It exits by itself after FAULTPROXY_LIFETIME seconds (600 by default).
local FP = {}

FP.BUILD = os.getenv("CHATSTREAM_BUILD_DIR") or "build"

local function shq(s)
  return "'" .. (tostring(s):gsub("'", "'\\''")) .. "'"
end

local function slurp(path)
  local f = io.open(path, "r")
  if not f then
    return ""
  end
  local s = f:read("a") or ""
  f:close()
  return s
end

local function sleep(s)
  os.execute("sleep " .. s)
end

local Proxy = {}
Proxy.__index = Proxy

function Proxy:exited()
  return slurp(self.out):match("exit (%d+)") ~= nil
end

--- The proxy's stderr so far (one line per connection and per fault).
function Proxy:log_text()
  return slurp(self.log)
end

function Proxy:signal(sig)
  assert(not self.stopped, "faultproxy: already stopped")
  local ok = os.execute(("kill -%s %d 2>/dev/null"):format(sig, self.pid))
  assert(ok, "faultproxy: kill -" .. sig .. " failed (proxy gone?):\n" .. self:log_text())
end

function Proxy:cut()
  self:signal("USR1")
end

function Proxy:stall()
  self:signal("USR2")
end

function Proxy:resume()
  self:signal("USR2")
end

function Proxy:drop()
  self:signal("HUP")
end

--- base_dsn (a postgresql:// URI or key=value conninfo) aimed at the proxy.
function Proxy:dsn(base_dsn)
  base_dsn = base_dsn or os.getenv("CHATSTREAM_TEST_DSN")
  assert(base_dsn, "faultproxy: no DSN given and CHATSTREAM_TEST_DSN unset")
  local hostport = "127.0.0.1:" .. self.port
  local scheme, authority, rest = base_dsn:match("^(%a[%w+.-]*://)([^/?#]*)(.*)$")
  if scheme then
    local userinfo = authority:match("^(.*@)") or ""
    return scheme .. userinfo .. hostport .. rest
  end
  -- key=value form: replace host, hostaddr and port
  local kept = {}
  for _, kv in ipairs(FP.split_conninfo(base_dsn)) do
    local k = kv:match("^%s*([%w_]+)%s*=")
    if k ~= "host" and k ~= "hostaddr" and k ~= "port" then
      kept[#kept + 1] = kv
    end
  end
  kept[#kept + 1] = "host=127.0.0.1"
  kept[#kept + 1] = "port=" .. self.port
  return table.concat(kept, " ")
end

--- Stops the proxy (SIGTERM, then SIGKILL after 5 s) and waits until it is
-- gone. Idempotent; returns the proxy's exit status.
function Proxy:stop()
  if self.stopped then
    return self.status
  end
  self.stopped = true
  if not self:exited() then
    os.execute(("kill -TERM %d 2>/dev/null"):format(self.pid))
    local deadline = os.time() + 5
    while not self:exited() and os.time() <= deadline do
      sleep(0.02)
    end
    if not self:exited() then
      os.execute(("kill -KILL %d 2>/dev/null"):format(self.pid))
    end
  end
  self.h:close() -- waits for the shell, which waits for the proxy
  self.status = math.tointeger(tonumber(slurp(self.out):match("exit (%d+)") or ""))
  os.remove(self.out)
  os.remove(self.pidfile)
  if not self.keep_log then
    os.remove(self.log)
  end
  return self.status
end

Proxy.__close = Proxy.stop

-- A proxy nobody stopped (a spec failed before stop) is stopped when it is
-- collected or Lua exits; should stop fail there, it is killed, so the close
-- of its shell's handle, which waits for it, does not hang.
function Proxy:__gc()
  if not pcall(Proxy.stop, self) and self.pid then
    os.execute(("kill -KILL %d 2>/dev/null"):format(self.pid))
  end
end

--- Splits a key=value conninfo into its "key=value" items (quotes kept).
function FP.split_conninfo(s)
  local items, i, n = {}, 1, #s
  while i <= n do
    local _, e = s:find("^%s+", i)
    if e then
      i = e + 1
    end
    if i > n then
      break
    end
    local j = i
    local item = {}
    while j <= n and not s:sub(j, j):match("%s") do
      local c = s:sub(j, j)
      if c == "'" then
        local k = j + 1
        while k <= n and s:sub(k, k) ~= "'" do
          if s:sub(k, k) == "\\" then
            k = k + 1
          end
          k = k + 1
        end
        item[#item + 1] = s:sub(j, k)
        j = k + 1
      else
        item[#item + 1] = c
        j = j + 1
      end
    end
    items[#items + 1] = table.concat(item)
    i = j
  end
  return items
end

--- Starts a proxy to target_host:target_port on a free loopback port and waits
-- (up to 5 s) until it listens. opts.keep_log: stop() leaves p.log in place;
-- opts.cut_match: only a request containing that text arms a cut (e.g.
-- "COMMIT": the reply to the commit is the one lost).
function FP.start(target_host, target_port, opts)
  opts = opts or {}
  local bin = FP.BUILD .. "/faultproxy"
  local p = { out = os.tmpname(), log = os.tmpname(), pidfile = os.tmpname(), keep_log = opts.keep_log }
  local match = opts.cut_match and ("FAULTPROXY_CUT_MATCH=" .. shq(opts.cut_match) .. " ") or ""
  local cmd = ("env -u LD_PRELOAD %s%s 0 %s %s %s >>%s 2>%s </dev/null; echo \"exit $?\" >>%s"):format(
    match, shq(bin), shq(target_host), shq(target_port), shq(p.pidfile),
    shq(p.out), shq(p.log), shq(p.out))
  p.h = assert(io.popen(cmd, "r"))
  -- the metatable (and so __gc) after the handle: at exit Lua finalizes p
  -- first, which stops the proxy, before the handle's own close waits for it
  setmetatable(p, Proxy)
  local deadline = os.time() + 5
  while true do
    local text = slurp(p.out)
    local port = text:match("^port (%d+)")
    if port then
      p.port = math.tointeger(tonumber(port))
      p.pid = math.tointeger(tonumber(slurp(p.pidfile):match("%d+") or ""))
      break
    end
    if text:match("exit %d+") or os.time() > deadline then
      local log = slurp(p.log)
      p.stopped = true
      if not text:match("exit %d+") then
        -- no port after 5 s: it hangs; the pidfile may name it
        local pid = slurp(p.pidfile):match("%d+")
        if pid then
          os.execute("kill -KILL " .. pid .. " 2>/dev/null")
        end
      end
      p.h:close()
      os.remove(p.out)
      os.remove(p.log)
      os.remove(p.pidfile)
      error(("faultproxy: %s did not start (%s):\n%s"):format(bin, text, log), 2)
    end
    sleep(0.02)
  end
  assert(p.pid, "faultproxy: no pid in " .. p.pidfile)
  return p
end

return FP
