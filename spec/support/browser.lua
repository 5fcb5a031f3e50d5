-- spec/support/browser.lua - a headless Chromium driven over the DevTools protocol, for specs of a live page.
--
--   local B = require("support.browser")
--   local ok, why = B.available()     -- false, "...: apt-get install chromium" when it cannot run
--   local b = B.launch({ timeout = 10 })   -- b.pid, b.port, b.dir, b.launch_time (seconds)
--   local page = b:open(url)          -- a new tab, returned once document.readyState is "complete"
--   page:eval("document.title")       -- the value (awaited if a promise); raises if the page throws
--   page:wait("document.querySelectorAll('li').length >= 5", 5)   -- the first truthy value
--   page:navigate(url); page:call(method, params); b:call(method, params)   -- raw CDP
--   page:close(); b:close()           -- both may be called twice; b:close() also on __close/__gc
--   B.close_all()                     -- every browser still open (for a teardown or finally)
--   b:pids()                          -- the pids of it still running, zombies aside: {} once closed
--
-- Every call blocks, bounded by opts.timeout (10 s by default) or its own timeout argument,
-- stepping the browser's own cqueues controller until the reply with its id arrives. One
-- websocket carries every page as a flat session; events are ignored but for a page detached
-- or crashed. Values come as JSON has them, integral numbers as integers, a top-level null or
-- undefined as nil, a nested null as B.null.
--
-- Chromium runs in a session of its own (setsid): its pid is the process group of every
-- process it forks but the crash handlers, which leave the group but name b.dir. close()
-- kills both and waits until none runs (orphaned zombies are init's to reap). A watchdog in
-- the group kills it once the Lua process that launched it is gone. Chromium and the helper
-- commands run without the sanitizer variables: an ASan build's LD_PRELOAD is for the spec.
local B = {}

require("chatstream.lua_http") -- lua-http under 5.4: its 5.3/5.2 paths

local function need(name)
  local ok, m = pcall(require, name)
  return ok and m or nil
end

local cqueues, websocket, cjson = need("cqueues"), need("http.websocket"), need("cjson")
local ETIMEDOUT = (need("cqueues.errno") or {}).ETIMEDOUT
local now = cqueues and cqueues.monotime
B.null = cjson and cjson.null

-- Beyond --headless and the port: no sandbox (root in a container), no first-run, update,
-- extension or other background traffic, shared memory under /tmp rather than a small
-- /dev/shm, full-speed timers in tabs not in front, no keyring lookup.
B.FLAGS = {
  "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0", "--no-first-run",
  "--no-default-browser-check", "--disable-dev-shm-usage", "--disable-background-networking",
  "--disable-component-update", "--disable-extensions", "--disable-background-timer-throttling",
  "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows", "--password-store=basic",
}

-- Under an ASan runtime ps hangs and mktemp aborts on a leak; commands run without it.
local CLEAN = "unset LD_PRELOAD ASAN_OPTIONS LSAN_OPTIONS UBSAN_OPTIONS TSAN_OPTIONS; "

local function shq(s)
  return "'" .. (tostring(s):gsub("'", "'\\''")) .. "'"
end

local function sh(cmd)
  local h = io.popen(CLEAN .. cmd, "r")
  local out = h:read("a")
  h:close()
  return out
end

local function pause(s)
  os.execute(CLEAN .. "sleep " .. s)
end

local function slurp(path)
  local f = io.open(path, "r")
  local s = f and f:read("a")
  if f then
    f:close()
  end
  return s or ""
end

--- $CHATSTREAM_CHROMIUM, Debian's binary (not its wrapper script, which adds flags), or one on PATH.
function B.binary()
  local env = os.getenv("CHATSTREAM_CHROMIUM") or ""
  local list = env ~= "" and shq(env) or "/usr/lib/chromium/chromium chromium chromium-browser"
  return sh("for c in " .. list .. "; do command -v \"$c\" && break; done"):match("[^\n]+")
end

function B.available()
  if not (cqueues and websocket and cjson) then
    return false, "lua-http, lua-cqueues or lua-cjson missing: apt-get install lua-http lua-cqueues lua-cjson"
  elseif not B.binary() then
    return false, "chromium not found: apt-get install chromium (or set CHATSTREAM_CHROMIUM)"
  end
  return true
end

-- Runs fn in the browser's controller until it returns; each wait in fn has a deadline.
local function run(b, fn, ...)
  local args, box = table.pack(...), nil
  b.cq:wrap(function()
    box = table.pack(pcall(fn, table.unpack(args, 1, args.n)))
  end)
  while not box do
    assert(b.cq:step())
  end
  if not box[1] then
    error(box[2], 0)
  end
  return table.unpack(box, 2, box.n)
end

local function exited(b)
  return slurp(b.dir .. "/status"):match("%d+")
end

local function lost(b, why)
  b.dead = true
  local t0 = now()
  while not exited(b) and now() - t0 < 0.5 do
    pause(0.02)
  end
  local log = slurp(b.dir .. "/log"):gsub("[^\n]*dbus[^\n]*\n", "")
  error(string.format("chromium (pid %s) %s: %s\n%s", b.pid, exited(b) and ("exited with status " .. exited(b))
    or "connection lost", tostring(why), log:sub(-600)), 0)
end

-- Sends a command and reads until its reply; inside run().
local function request(b, method, params, session, timeout)
  local id, deadline = b.next_id, now() + timeout
  b.next_id = id + 1
  local sent, err = b.ws:send(cjson.encode({ id = id, method = method, params = params or {}, sessionId = session }),
    "text", timeout)
  if not sent then
    lost(b, err)
  end
  while true do
    if session and b.gone[session] then
      error(method .. ": " .. b.gone[session], 0)
    end
    local left, data, errno = deadline - now(), nil, nil
    if left > 0 then
      data, err, errno = b.ws:receive(left)
    end
    if not data and (left <= 0 or errno == ETIMEDOUT) then
      error(string.format("%s: no reply from chromium within %g s", method, timeout), 0)
    elseif not data then
      lost(b, err)
    end
    local m = cjson.decode(data)
    if m.id == id and m.error then
      error(method .. ": " .. tostring(m.error.message) .. (m.error.data and (" " .. m.error.data) or ""), 0)
    elseif m.id == id then
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
  assert(B.available())
  local dir = assert(sh("mktemp -d /tmp/chatstream-browser.XXXXXX"):match("^/[^\n]+"), "mktemp -d failed")
  local b = setmetatable({ dir = dir, timeout = opts.timeout or 10, cq = cqueues.new(), next_id = 1, gone = {} },
    Browser)
  live[b] = true
  local argv = { shq(opts.binary or B.binary()) }
  for _, f in ipairs(B.FLAGS) do
    argv[#argv + 1] = shq(f)
  end
  argv[#argv + 1] = shq("--user-data-dir=" .. dir .. "/profile") .. " about:blank"
  -- In the new session ($0 is this Lua process): note the pid, start the watchdog, become
  -- Chromium. A background subshell waits for it and notes its status. The crash handlers'
  -- database goes under XDG_CONFIG_HOME, so they name dir.
  local inner = string.format("echo $$ >%s; (while kill -0 $0; do sleep 1; done; kill -KILL -$$) "
    .. ">/dev/null 2>&1 </dev/null & exec %s", shq(dir .. "/pid"), table.concat(argv, " "))
  os.execute(string.format("%s exec 2>/dev/null; (XDG_CONFIG_HOME=%s XDG_CACHE_HOME=%s setsid -w sh -c %s \"$PPID\" "
    .. ">%s 2>&1 </dev/null; echo $? >%s) &", CLEAN, shq(dir .. "/config"), shq(dir .. "/cache"), shq(inner),
    shq(dir .. "/log"), shq(dir .. "/status")))
  local t0 = now()
  local ok, err = pcall(run, b, function()
    while now() - t0 < b.timeout and not exited(b) do
      local port, path = slurp(dir .. "/profile/DevToolsActivePort"):match("^(%d+)\n(/%S+)")
      b.pid = b.pid or math.tointeger(tonumber(slurp(dir .. "/pid"):match("%d+")))
      if port and b.pid then
        b.port = math.tointeger(tonumber(port))
        b.ws = websocket.new_from_uri(string.format("ws://127.0.0.1:%s%s", port, path))
        return assert(b.ws:connect(b.timeout - (now() - t0)))
      end
      cqueues.sleep(0.02)
    end
    error(exited(b) and ("it exited with status " .. exited(b)) or ("no DevTools port within " .. b.timeout .. " s"), 0)
  end)
  if not ok then
    local log = slurp(dir .. "/log"):gsub("[^\n]*dbus[^\n]*\n", "")
    b:close()
    error("chromium did not start: " .. tostring(err) .. "\n" .. log:sub(-600), 2)
  end
  b.launch_time = now() - t0
  return b
end

function Browser:pids()
  local pids = {}
  for pid, sid, st, args in sh("ps -eo pid=,sid=,stat=,args="):gmatch(" *(%d+) +(%d+) +(%S+) ([^\n]*)") do
    if self.pid and not st:find("^Z") and (tonumber(sid) == self.pid or args:find(self.dir, 1, true)) then
      pids[#pids + 1] = pid
    end
  end
  return pids
end

-- If polite, asks Chromium to quit (2 s at most); then kills what runs of it until nothing
-- does (5 s more at most) and removes its directory. Not polite from __gc, which may run
-- inside a step of the controller.
local function shut(b, polite)
  if b.closed then
    return
  end
  b.closed, live[b] = true, nil
  local t0 = now()
  if polite and b.ws and not b.dead then
    pcall(run, b, request, b, "Browser.close", nil, nil, 2)
    while not exited(b) and now() - t0 < 2 do
      pause(0.02)
    end
  end
  b.ws = nil
  local pids = b.pid and { "-" .. b.pid } or {}
  while #pids > 0 and now() - t0 < 7 do
    os.execute(CLEAN .. "kill -KILL " .. table.concat(pids, " ") .. " 2>/dev/null")
    pause(0.05)
    pids = b:pids()
  end
  os.execute(CLEAN .. "rm -rf " .. shq(b.dir))
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

function Browser:open(url, timeout)
  local target = self:call("Target.createTarget", { url = "about:blank" }).targetId
  local session = self:call("Target.attachToTarget", { targetId = target, flatten = true }).sessionId
  local page = setmetatable({ browser = self, target = target, session = session }, Page)
  local ok, err = pcall(function()
    page:call("Inspector.enable")
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

-- Evaluates js; returns true and its value, or false and the text of what it threw.
local function evaluate(page, js, timeout)
  local r = page:call("Runtime.evaluate", { expression = js, returnByValue = true, awaitPromise = true }, timeout)
  local d, res = r.exceptionDetails, r.result
  if d then
    local e = d.exception or {}
    return false, e.description or (e.value ~= nil and tostring(e.value)) or d.text or "exception"
  elseif res.unserializableValue then -- a BigInt or -0 as a number, NaN or Infinity by name
    return true, tonumber((res.unserializableValue:gsub("n$", ""))) or res.unserializableValue
  end
  return true, res.value ~= cjson.null and lua_value(res.value) or nil
end

function Page:eval(expr, timeout)
  local ok, v = evaluate(self, expr, timeout)
  if not ok then
    error(string.format("page threw evaluating %s: %s", expr, v), 2)
  end
  return v
end

--- Evaluates expr every interval seconds until it is truthy as JavaScript sees it. A throw,
-- or a CDP error (a navigation in between), is a not yet; a syntax error, a lost browser or
-- a closed page raise at once.
function Page:wait(expr, timeout, interval)
  timeout = timeout or self.browser.timeout
  local b, deadline, last = self.browser, now() + timeout, "(none yet)"
  local js = "(async () => { try { const v = await (" .. expr .. "\n); return { ok: !!v, v: v }; }"
    .. " catch (e) { return { err: String(e && e.stack || e) }; } })()"
  while deadline - now() > 0 do
    local ok, fine, r = pcall(evaluate, self, js, deadline - now())
    if ok and not fine then
      error(string.format("page cannot evaluate %s: %s", expr, r), 2)
    elseif not ok and (self.closed or b.closed or b.dead or b.gone[self.session]) then
      error(fine, 2)
    elseif ok and r.ok then
      return r.v ~= cjson.null and r.v or nil
    end
    last = not ok and fine or r.err or select(2, pcall(cjson.encode, r.v))
    if deadline - now() > 0 then
      run(b, cqueues.sleep, math.min(interval or 0.05, deadline - now()))
    end
  end
  error(string.format("timed out after %g s waiting for %s; last value: %s", timeout, expr, last), 2)
end

function Page:close()
  if not self.closed then
    self.closed = true
    if not self.browser.closed and not self.browser.gone[self.session] then
      pcall(self.browser.call, self.browser, "Target.closeTarget", { targetId = self.target })
    end
  end
end
Page.__close = Page.close

return B
