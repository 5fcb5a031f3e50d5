-- spec/support/browser.lua - a headless Chromium driven over the DevTools protocol, for specs of a live page.
--
--   local B = require("support.browser")
--   local ok, why = B.available()     -- false, "...: apt-get install chromium" when it cannot run
--   local b = B.launch({ timeout = 10 })               -- b.pid, b.port, b.dir
--   local page = b:open("http://127.0.0.1:8080/")      -- returns once the load event has passed
--   page:eval("document.title")       -- the value as JSON has it; raises if the page throws
--   page:wait("document.querySelectorAll('li').length >= 5", 5)   -- the first truthy value
--   page:close(); b:close()           -- both may be called twice; b:close() also on __close/__gc
--   B.close_all()                     -- closes every browser still open (for a teardown)
--
-- Every call is blocking, bounded by opts.timeout (10 s by default) or its own timeout
-- argument, and drives the browser's own cqueues controller until its reply arrives. One
-- websocket to the browser carries every page, each page a flat session (CDP sessionId);
-- replies are matched by id and events are ignored, but for a page being detached or crashed.
--
-- Chromium runs in a session of its own (setsid), so that its pid is also the process group
-- of every renderer, zygote and utility process it forks; close() kills that group and waits
-- until none of it runs. A watchdog shell in the group kills it as well once the Lua process
-- that launched it has gone, so a spec process that dies leaves no browser behind.
-- Sanitizer variables are removed from its environment: an ASan build's LD_PRELOAD is for
-- the spec process, not for Chromium.
local B = {}

local function need(name)
  local ok, m = pcall(require, name)
  if not ok and not package.path:find("/usr/share/lua/5.3/", 1, true) then
    -- Debian installs lua-http as pure Lua under the 5.3 and 5.2 paths only.
    package.path = package.path .. ";/usr/share/lua/5.3/?.lua;/usr/share/lua/5.3/?/init.lua"
      .. ";/usr/share/lua/5.2/?.lua;/usr/share/lua/5.2/?/init.lua"
    ok, m = pcall(require, name)
  end
  return ok and m or nil
end

local cqueues, websocket, cjson = need("cqueues"), need("http.websocket"), need("cjson")
local ETIMEDOUT = (need("cqueues.errno") or {}).ETIMEDOUT
B.null = cjson and cjson.null
B.FLAGS = {
  "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0", "--no-first-run",
  "--no-default-browser-check", "--disable-dev-shm-usage",
  "--disable-background-networking", "--disable-component-update", "--disable-extensions",
  "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
  "--disable-backgrounding-occluded-windows", "--password-store=basic",
}

local function shq(s)
  return "'" .. (tostring(s):gsub("'", "'\\''")) .. "'"
end

local function slurp(path)
  local f = io.open(path, "r")
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  return s
end

local function sh(cmd)
  local h = io.popen(cmd, "r")
  local out = h:read("a")
  h:close()
  return out
end

local function pause(s)
  os.execute("sleep " .. s)
end

--- The Chromium executable: $CHATSTREAM_CHROMIUM, Debian's binary behind its wrapper script, or PATH.
function B.binary()
  local b = os.getenv("CHATSTREAM_CHROMIUM")
  if b and b ~= "" then
    return b
  end
  local f = io.open("/usr/lib/chromium/chromium", "r")
  if f then
    f:close()
    return "/usr/lib/chromium/chromium"
  end
  local found = sh("command -v chromium chromium-browser google-chrome 2>/dev/null"):match("[^\n]+")
  return found
end

function B.available()
  if not (cqueues and websocket and cjson) then
    return false, "lua-http, lua-cqueues or lua-cjson missing: apt-get install lua-http lua-cjson"
  end
  if not B.binary() then
    return false, "chromium not found: apt-get install chromium (or set CHATSTREAM_CHROMIUM)"
  end
  return true
end

-- Runs fn inside the browser's controller and steps it until fn returns; every wait inside
-- fn has a deadline, so the steps end.
local function run(b, fn, ...)
  local box
  local args = table.pack(...)
  b.cq:wrap(function()
    box = table.pack(pcall(fn, table.unpack(args, 1, args.n)))
  end)
  while not box do
    local ok, err = b.cq:step()
    if not ok then
      error(err, 0)
    end
  end
  if not box[1] then
    error(box[2], 0)
  end
  return table.unpack(box, 2, box.n)
end

local function log_tail(b)
  local lines = {}
  for l in (slurp(b.dir .. "/log") or ""):gmatch("[^\n]+") do
    if not l:find("dbus", 1, true) then
      lines[#lines + 1] = l
    end
  end
  return table.concat(lines, "\n", math.max(1, #lines - 5))
end

local function exited(b)
  return (slurp(b.dir .. "/status") or ""):match("%d+")
end

local function lost(b, why)
  b.dead = true
  local t0 = cqueues.monotime()
  while not exited(b) and cqueues.monotime() - t0 < 0.5 do
    pause(0.02) -- a dying browser notes its status within moments
  end
  local status = exited(b)
  error(string.format("chromium (pid %s) %s: %s\n%s", b.pid, status and ("exited with status " .. status)
    or "connection lost", tostring(why), log_tail(b)), 0)
end

-- Sends one command and waits for the reply with its id; inside run().
local function request(b, method, params, session, timeout)
  local id = b.next_id
  b.next_id = id + 1
  local deadline = cqueues.monotime() + timeout
  local ok, err = b.ws:send(cjson.encode({ id = id, method = method, params = params or {}, sessionId = session }),
    "text", timeout)
  if not ok then
    lost(b, err)
  end
  while true do
    if session and b.gone[session] then
      error(method .. ": " .. b.gone[session], 0)
    end
    local left = deadline - cqueues.monotime()
    local data, rerr, errno
    if left > 0 then
      data, rerr, errno = b.ws:receive(left)
    end
    if not data then
      if left <= 0 or errno == ETIMEDOUT then
        error(string.format("%s: no reply from chromium within %g s", method, timeout), 0)
      end
      lost(b, rerr)
    end
    local m = cjson.decode(data)
    if m.id == id then
      if m.error then
        error(method .. ": " .. tostring(m.error.message) .. (m.error.data and (" " .. m.error.data) or ""), 0)
      end
      return m.result
    elseif m.method == "Target.detachedFromTarget" then
      b.gone[m.params.sessionId] = "the page was closed or its renderer went away"
    elseif m.method == "Inspector.targetCrashed" and m.sessionId then
      b.gone[m.sessionId] = "the page's renderer crashed"
    end
  end
end

local Browser, Page = {}, {}
Browser.__index, Page.__index = Browser, Page
local live = setmetatable({}, { __mode = "k" })

function Browser:call(method, params, session, timeout)
  if self.closed then
    error("attempt to use a closed browser", 2)
  end
  return run(self, request, self, method, params, session, timeout or self.timeout)
end

function B.launch(opts)
  opts = opts or {}
  local ok, why = B.available()
  if not ok then
    error(why, 2)
  end
  local dir = sh("mktemp -d /tmp/chatstream-browser.XXXXXX"):match("[^\n]+")
  local b = setmetatable({ dir = dir, timeout = opts.timeout or 10, cq = cqueues.new(), next_id = 1, gone = {} },
    Browser)
  live[b] = true
  local argv = { shq(opts.binary or B.binary()) }
  for _, f in ipairs(B.FLAGS) do
    argv[#argv + 1] = shq(f)
  end
  argv[#argv + 1] = shq("--user-data-dir=" .. dir .. "/profile")
  argv[#argv + 1] = "about:blank"
  -- Inside the new session: record the pid, start the watchdog, become Chromium.
  local inner = string.format("echo $$ >%s; (while kill -0 %s; do sleep 1; done; kill -KILL -$$) "
    .. ">/dev/null 2>&1 </dev/null & exec %s", shq(dir .. "/pid"), "$0", table.concat(argv, " "))
  -- $PPID of the shell is this Lua process. A background subshell waits for Chromium and notes
  -- its exit status; nothing here waits for it (a popen handle would block in its own __gc).
  os.execute(string.format("exec 2>/dev/null; (env -u LD_PRELOAD -u ASAN_OPTIONS -u LSAN_OPTIONS -u UBSAN_OPTIONS -u TSAN_OPTIONS "
    .. "XDG_CONFIG_HOME=%s XDG_CACHE_HOME=%s setsid -w sh -c %s \"$PPID\" >%s 2>&1 </dev/null; echo $? >%s) &",
    shq(dir .. "/config"), shq(dir .. "/cache"), shq(inner), shq(dir .. "/log"), shq(dir .. "/status")))
  local t0 = cqueues.monotime()
  local found = pcall(run, b, function()
    while cqueues.monotime() - t0 < b.timeout and not exited(b) do
      local port, path = (slurp(dir .. "/profile/DevToolsActivePort") or ""):match("^(%d+)\n(/%S+)")
      b.pid = b.pid or math.tointeger(tonumber((slurp(dir .. "/pid") or ""):match("%d+")))
      if port and b.pid then
        b.port = math.tointeger(tonumber(port))
        b.ws = websocket.new_from_uri(string.format("ws://127.0.0.1:%s%s", port, path))
        return assert(b.ws:connect(b.timeout - (cqueues.monotime() - t0)))
      end
      cqueues.sleep(0.02)
    end
    error("no DevToolsActivePort")
  end)
  if not found then
    local msg = string.format("chromium did not start within %g s (%s)\n%s", b.timeout,
      exited(b) and ("exit status " .. exited(b)) or "still no DevTools port", log_tail(b))
    b:close()
    error(msg, 2)
  end
  b.launch_time = cqueues.monotime() - t0
  return b
end

-- The pids of b's processes still running: those of its session, and the crash handlers,
-- which leave the session but name b.dir (their database is under XDG_CONFIG_HOME).
local function running(b)
  local pids = {}
  for pid, sid, st, args in sh("ps -eo pid=,sid=,stat=,args="):gmatch(" *(%d+) +(%d+) +(%S+) ([^\n]*)") do
    if not st:find("^Z") and (tonumber(sid) == b.pid or args:find(b.dir, 1, true)) then
      pids[#pids + 1] = pid
    end
  end
  return pids
end

-- Stops Chromium: if polite, asks it to quit and gives it 2 s; then kills its process group
-- and whatever else of it runs, until nothing does but zombies (at most 5 s more); removes
-- its directory.
-- Not polite from __gc, which may run inside a step of the controller.
local function shut(b, polite)
  if b.closed then
    return
  end
  b.closed, live[b] = true, nil
  local t0 = cqueues.monotime()
  if polite and b.ws and not b.dead then
    pcall(run, b, request, b, "Browser.close", nil, nil, 2)
    while not exited(b) and cqueues.monotime() - t0 < 2 do
      pause(0.02)
    end
  end
  b.ws = nil
  if b.pid then
    os.execute("kill -KILL -" .. b.pid .. " 2>/dev/null")
    local pids = running(b)
    while #pids > 0 and cqueues.monotime() - t0 < 7 do
      os.execute("kill -KILL " .. table.concat(pids, " ") .. " 2>/dev/null")
      pause(0.05)
      pids = running(b)
    end
  end
  os.execute("rm -rf " .. shq(b.dir))
end

function Browser:close()
  shut(self, true)
end
Browser.__close = Browser.close
function Browser.__gc(b)
  shut(b, false)
end

function B.close_all()
  for b in pairs(live) do
    b:close()
  end
end

--- A new tab at url (about:blank if nil), once its load event has passed.
function Browser:open(url, timeout)
  local target = self:call("Target.createTarget", { url = "about:blank" }).targetId
  local session = self:call("Target.attachToTarget", { targetId = target, flatten = true }).sessionId
  local page = setmetatable({ browser = self, target = target, session = session }, Page)
  local ok, err = pcall(function()
    self:call("Inspector.enable", nil, session)
    if url and url ~= "about:blank" then
      page:navigate(url, timeout)
    end
  end)
  if not ok then
    page:close()
    error(err, 2)
  end
  return page
end

function Page:call(method, params, timeout)
  if self.closed then
    error("attempt to use a closed page", 2)
  end
  return self.browser:call(method, params, self.session, timeout)
end

function Page:navigate(url, timeout)
  local r = self:call("Page.navigate", { url = url }, timeout)
  if r.errorText then
    error(string.format("navigating to %s: %s", url, r.errorText), 2)
  end
  self:wait("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)
end

-- A JSON value as Lua has it: integral numbers as integers.
local function lua_value(v)
  if math.type(v) == "float" and math.tointeger(v) then
    return math.tointeger(v)
  elseif type(v) == "table" then
    for k, x in pairs(v) do
      v[k] = lua_value(x)
    end
  end
  return v
end

-- The value of a Runtime.evaluate result: undefined and null as nil, NaN and the like as numbers.
local function value(r)
  local u = r.unserializableValue
  if u then
    return ({ NaN = 0 / 0, Infinity = math.huge, ["-Infinity"] = -math.huge, ["-0"] = -0.0 })[u]
      or math.tointeger(tonumber((u:gsub("n$", "")))) or u
  end
  if r.value == cjson.null then
    return nil
  end
  return lua_value(r.value)
end

-- Evaluates js; returns true and its value, or false and the text of what it threw.
local function evaluate(page, js, timeout)
  local r = page:call("Runtime.evaluate", { expression = js, returnByValue = true, awaitPromise = true }, timeout)
  local d = r.exceptionDetails
  if d then
    local e = d.exception
    return false, (e and (e.description or (e.value ~= nil and tostring(e.value)))) or d.text or "exception"
  end
  return true, value(r.result)
end

function Page:eval(expr, timeout)
  local ok, v = evaluate(self, expr, timeout)
  if not ok then
    error(string.format("page threw evaluating %s: %s", expr, v), 2)
  end
  return v
end

local function show(v)
  local ok, s = pcall(cjson.encode, v)
  return ok and s or tostring(v)
end

--- Evaluates expr (awaited if a promise) every interval seconds until it is truthy in
-- JavaScript's sense and returns it. A throw counts as not yet, and so does a CDP error
-- (a navigation in between); a syntax error, a lost browser or a gone page raise at once.
function Page:wait(expr, timeout, interval)
  timeout = timeout or self.browser.timeout
  local deadline = cqueues.monotime() + timeout
  local js = "(async () => { try { const v = await (" .. expr .. "\n); return { ok: !!v, v: v }; }"
    .. " catch (e) { return { err: String(e && e.stack || e) }; } })()"
  local b, last = self.browser, "(none yet)"
  while true do
    local left = deadline - cqueues.monotime()
    if left <= 0 then
      break
    end
    local ok, thrown, r = pcall(evaluate, self, js, left)
    if ok and not thrown then
      error(string.format("page cannot evaluate %s: %s", expr, r), 2)
    elseif not ok and (b.closed or b.dead or b.gone[self.session]) then
      error(thrown, 2)
    elseif ok and r.ok then
      return r.v ~= cjson.null and r.v or nil
    end
    last = not ok and thrown or r.err or show(r.v)
    left = deadline - cqueues.monotime()
    if left > 0 then
      run(b, cqueues.sleep, math.min(interval or 0.05, left))
    end
  end
  error(string.format("timed out after %g s waiting for %s; last value: %s", timeout, expr, last), 2)
end

function Page:close()
  if self.closed then
    return
  end
  self.closed = true
  if not self.browser.closed and not self.browser.gone[self.session] then
    pcall(self.browser.call, self.browser, "Target.closeTarget", { targetId = self.target })
  end
end
Page.__close = Page.close

return B
