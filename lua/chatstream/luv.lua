-- chatstream.luv: chatstream inside a luv (libuv) loop.
--
--   local uv = require("luv")
--   local cs = require("chatstream.luv")
--   local store = cs.open(opts)      -- as chatstream.open
--   coroutine.wrap(function() ... store:append(...) ... sub:next(5) ... end)()
--   uv.run()
--
-- Called from a coroutine (one started with coroutine.wrap/create and then
-- resumed by the loop's callbacks), a call that would wait for the server
-- yields, and a poll handle on the store's engine fd resumes it when the
-- answer is there; sub:next(timeout) yields until the store has something.
-- Called from the main thread, every call blocks as chatstream's do.
local uv = require("luv")
local loop = require("chatstream.loop")

local backend = {}

function backend.can_yield()
  local _, main = coroutine.running()
  return not main and coroutine.isyieldable()
end

local function resume(co)
  local ok, err = coroutine.resume(co)
  if not ok then
    error(err, 0)
  end
end

-- One poll handle per descriptor (libuv allows no more), shared by the
-- coroutines waiting on it; each waiter may also have a timer.
local watchers = {}

local function watcher(fd)
  local w = watchers[fd]
  if not w then
    w = { handle = uv.new_poll(fd), waiters = {} }
    watchers[fd] = w
  end
  return w
end

local function drop(w, entry)
  for i, e in ipairs(w.waiters) do
    if e == entry then
      table.remove(w.waiters, i)
      break
    end
  end
  if #w.waiters == 0 then
    w.handle:stop()
  end
end

function backend.wait(fd, timeout)
  local co = coroutine.running()
  local w = watcher(fd)
  local entry = { co = co }
  if timeout then
    entry.timer = uv.new_timer()
    uv.update_time() -- libuv's clock is cached: it may be stale outside the loop
    entry.timer:start(math.max(0, math.ceil(timeout * 1000)), 0, function()
      drop(w, entry)
      entry.timer:close()
      entry.timer = nil
      resume(co)
    end)
  end
  w.waiters[#w.waiters + 1] = entry
  if #w.waiters == 1 then
    w.handle:start("r", function()
      local list = w.waiters
      w.waiters = {}
      w.handle:stop()
      for _, e in ipairs(list) do
        if e.timer then
          e.timer:stop()
          e.timer:close()
          e.timer = nil
        end
        resume(e.co)
      end
    end)
  end
  coroutine.yield()
end

-- The store closes its descriptors: their handles go first. Outside the
-- loop (the main thread, after uv.run returned) the loop runs once more so
-- the handles are gone before the Lua state is (libuv calls back on close).
function backend.forget(fd)
  local w = watchers[fd]
  if w then
    watchers[fd] = nil
    w.handle:stop()
    w.handle:close()
    if not backend.can_yield() then
      uv.run("nowait")
    end
  end
end

function backend.pause()
  local co, t = coroutine.running(), uv.new_timer()
  uv.update_time() -- libuv's clock is cached: it may be stale outside the loop
  t:start(0, 0, function()
    t:close()
    resume(co)
  end)
  coroutine.yield()
end

-- A lock handed on in turn, first come first served: give() passes it to
-- the next waiter on the loop's next turn (not from inside the giver).
function backend.new_turn()
  local t = { busy = false, queue = {} }
  function t.take(self)
    if self.busy then
      self.queue[#self.queue + 1] = coroutine.running()
      coroutine.yield() -- resumed holding the turn
    else
      self.busy = true
    end
  end
  function t.give(self)
    local co = table.remove(self.queue, 1)
    if not co then
      self.busy = false
      return
    end
    local timer = uv.new_timer()
    uv.update_time() -- libuv's clock is cached: it may be stale outside the loop
    timer:start(0, 0, function()
      timer:close()
      resume(co)
    end)
  end
  return t
end

return loop.adapter(backend)
