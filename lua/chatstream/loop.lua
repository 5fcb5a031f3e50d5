-- chatstream.loop: what the event-loop adapters share (chatstream.cqueues,
-- chatstream.luv). An adapter gives a backend:
--   backend.can_yield()        true inside a coroutine its loop runs
--   backend.wait(fd, timeout)  yields until fd is readable or timeout
--                              seconds passed (nil: no limit)
--   backend.new_turn()         a FIFO lock: turn:take() yields until it is
--                              this coroutine's turn, turn:give() passes it on
--   backend.pause()            yields to the loop, resumed on its next turn
-- and gets back open(), which opens a store whose methods, called from such a
-- coroutine, yield to the loop wherever they would wait: a call that needs
-- the store's server runs on the store's engine (store:job) and the
-- coroutine waits on the engine's fd; sub:next(timeout) waits on the store's
-- notifications. Outside a coroutine every call blocks as it always did.
-- The wait loop lives here, in Lua: no C frame is ever yielded across.
local chatstream = require("chatstream")
local core = require("chatstream.core")

local M = {}

local Store, Sub, Pub = core.Store, core.Subscription, core.Publish
local raw = { store = {}, sub = {}, pub = {} }
for k, v in pairs(Store) do raw.store[k] = v end
for k, v in pairs(Sub) do raw.sub[k] = v end
for k, v in pairs(Pub) do raw.pub[k] = v end

-- Store methods that only read what the store holds (no server, no change),
-- the engine's own, and stream (Lua over subscribe): called as they are,
-- even while another coroutine's call is parked. (try_step and step have
-- wrappers of their own.)
local DIRECT = {
  kind = true, stats = true, fd = true, pollfd = true, events = true, timeout = true,
  ready = true, listener_pid = true, job = true, job_write = true, resume = true, job_fd = true,
  notify_fd = true, stream = true, close = true, step = true, try_step = true,
}

-- Calls that touch only the database, nothing of what readers use in the
-- store while they wait on the server (writes, and the chat and queue
-- reads): they run as store:job_write, and while one waits, say on a row
-- lock, the readers' in-memory work (sub:try, try_step) goes on beside it.
local WRITES = {
  create_chat = true, append = true, append_many = true, send = true, delete_queued = true, move_queued = true,
  promote_queued = true, acquire = true, heartbeat = true, finish = true, interrupt = true, publish_part = true,
  submit_tool_results = true, recover = true, archive = true, unarchive = true, edit = true,
  chat = true, queued = true, migrate = true,
  commit = true, cache = true, notify = true, publish = true, -- Publish
}

-- store -> its loop state { backend, turn } (weak: a store that is gone)
local served = setmetatable({}, { __mode = "k" })

local function pack(...)
  return { n = select("#", ...), ... }
end

-- A loop's other coroutines get their turn at least every BREATHE seconds:
-- a run of calls that need no wait (events served from memory, answers
-- already there) yields to the loop once that long has passed since it last
-- waited. So no burst of work holds a ticker back by more than that.
local BREATHE = 0.005
local last_wait = chatstream.now()

local function breathe(b)
  local t = chatstream.now()
  if t - last_wait > BREATHE then
    b.pause()
    last_wait = chatstream.now()
  end
end

local function wait(b, fd, timeout)
  b.wait(fd, timeout)
  last_wait = chatstream.now()
end

-- Drives a call on an engine (a store's or core.engine()'s) in turn: starts
-- it, yields on the engine's fd while it waits, resumes it; its results, or
-- its error raised again. One call at a time per turn, first come first
-- served; done (or nil) runs when the call is over, before the turn passes.
local function drive(b, turn, start, resume, fd, done, ...)
  breathe(b)
  turn:take()
  local r = pack(pcall(start, ...))
  while r[1] and r[2] == false do
    wait(b, fd)
    r = pack(pcall(resume))
  end
  if done then
    done()
  end
  turn:give()
  if not r[1] then
    error(r[2], 0)
  end
  return table.unpack(r, 3, r.n)
end

-- Runs fn(...) on the store's engine, yielding while it waits. write: a
-- call that touches only the database (see WRITES).
local function on_engine(s, store, write, fn, ...)
  local function start(...)
    s.write = write -- set once the turn is this call's
    return (write and raw.store.job_write or raw.store.job)(store, fn, ...)
  end
  local function resume()
    return raw.store.resume(store)
  end
  local function done()
    s.write = false
  end
  return drive(s.backend, s.turn, start, resume, raw.store.job_fd(store), done, ...)
end

-- fn(...) in the store's turn (it changes what a parked call may be using);
-- beside a write that waits, at once (shared: what a write leaves alone).
local function in_turn(s, fn, shared, ...)
  breathe(s.backend)
  if shared and s.write then
    return fn(...)
  end
  s.turn:take()
  local r = pack(pcall(fn, ...))
  s.turn:give()
  if not r[1] then
    error(r[2], 0)
  end
  return table.unpack(r, 2, r.n)
end

local function serving(store)
  local s = served[store]
  if s and s.backend.can_yield() then
    return s
  end
end

local function through_engine(fn, write)
  return function(self, ...)
    local s = serving(self)
    if not s then
      return fn(self, ...)
    elseif s.memory then
      return in_turn(s, fn, false, self, ...) -- the memory store never waits
    end
    return on_engine(s, self, write, fn, self, ...)
  end
end

local wrapped = false

-- Puts the loop-aware methods in place (once). They behave exactly as
-- before for a store no adapter opened, or outside a loop's coroutine.
local function install()
  if wrapped then
    return
  end
  wrapped = true
  for name, fn in pairs(raw.store) do
    if not DIRECT[name] then
      Store[name] = through_engine(fn, WRITES[name] or false)
    end
  end
  -- close: the adapter's (it forgets the loop's watchers of the store's
  -- descriptors first).
  Store.close = function(self)
    local s = served[self]
    if s then
      return s.close(self)
    end
    return raw.store.close(self)
  end
  -- try_step changes what a parked call may be using: in turn (beside a
  -- write that waits, at once).
  Store.try_step = function(self)
    local s = serving(self)
    if not s then
      return raw.store.try_step(self)
    end
    return in_turn(s, raw.store.try_step, true, self)
  end
  -- step: what needs no server at once; the rest on the engine.
  Store.step = function(self)
    local s = serving(self)
    if not s then
      return raw.store.step(self)
    end
    local n = in_turn(s, raw.store.try_step, true, self)
    if n == false then
      return on_engine(s, self, false, raw.store.step, self)
    end
    return n
  end
  for name, fn in pairs(raw.pub) do
    if name ~= "close" then
      Pub[name] = function(self, ...)
        local store = raw.pub.store(self)
        local s = store and serving(store)
        if not s then
          return fn(self, ...)
        elseif s.memory then
          return in_turn(s, fn, false, self, ...)
        end
        return on_engine(s, store, WRITES[name] or false, fn, self, ...)
      end
    end
  end
  -- close may UNLISTEN on the server: on the engine too.
  Sub.close = function(self)
    local store = raw.sub.store(self)
    local s = store and serving(store)
    if not s then
      return raw.sub.close(self)
    elseif s.memory then
      return in_turn(s, raw.sub.close, false, self)
    end
    return on_engine(s, store, false, raw.sub.close, self)
  end
  -- next(timeout): what the subscription has without the server at once;
  -- a pass that needs it on the engine; then wait for the store's
  -- notifications (not its pollfd: another subscription's events keep that
  -- readable) or the store's own deadline, whichever comes first.
  Sub.next = function(self, timeout)
    local store = raw.sub.store(self)
    local s = store and serving(store)
    if not s then
      return raw.sub.next(self, timeout)
    end
    local deadline = timeout and timeout > 0 and chatstream.now() + timeout
    while true do
      local ev, err, code = in_turn(s, raw.sub.try, true, self)
      if ev then
        return ev
      elseif ev == false then -- it needs the server
        ev, err, code = on_engine(s, store, false, raw.sub.next, self, 0)
        if ev then
          return ev
        elseif code ~= "ETIMEDOUT" then
          return nil, err, code
        end
      elseif err then
        return nil, err, code
      end
      local left = deadline and deadline - chatstream.now()
      if not left or left <= 0 then
        return nil, "timeout", "ETIMEDOUT"
      end
      local t = raw.store.timeout(store)
      wait(s.backend, raw.store.notify_fd(store), t and t < left and t or left)
      if not s.memory then
        Store.step(store)
      end
    end
  end
  Sub.events = function(self, timeout)
    return function(sub)
      local ev, err, code = sub:next(timeout)
      if ev then
        return ev
      elseif code == "ETIMEDOUT" then
        return nil
      end
      error(err, 2)
    end, self, nil
  end
end

--- Returns open(opts) for a backend: chatstream.open(opts), marked as
-- served by that backend's loop.
function M.adapter(backend)
  install()
  local A = setmetatable({}, { __index = chatstream })
  local opener, opener_turn -- an engine for opens made inside the loop
  -- chatstream.open(...) on the opener engine: the connects and the probe
  -- yield to the loop.
  local function open_in_loop(...)
    opener = opener or core.engine()
    opener_turn = opener_turn or backend.new_turn()
    local function start(...)
      return opener:job(chatstream.open, ...)
    end
    local function resume()
      return opener:resume()
    end
    return drive(backend, opener_turn, start, resume, opener:fd(), nil, ...)
  end
  function A.open(...)
    local store, err, code
    if backend.can_yield() then
      store, err, code = open_in_loop(...)
    else
      store, err, code = chatstream.open(...)
    end
    if not store then
      return nil, err, code
    end
    served[store] = {
      backend = backend, turn = backend.new_turn(), close = A.close, memory = store:kind() == "memory",
    }
    return store
  end
  --- Closes the store (after any call of it still under way), and forgets
  -- the loop's watchers of its descriptors.
  function A.close(store)
    local s = served[store]
    if not s or not pcall(raw.store.pollfd, store) then
      return raw.store.close(store) -- not served, or closed already
    end
    local fds = { raw.store.pollfd(store), raw.store.notify_fd(store), raw.store.job_fd(store) }
    local inside = backend.can_yield()
    if inside then
      s.turn:take() -- after any call still under way
    end
    if backend.forget then
      for _, fd in pairs(fds) do
        backend.forget(fd)
      end
    end
    served[store] = nil
    raw.store.close(store)
    if inside then
      s.turn:give() -- the ones waiting their turn find the store closed
    end
  end
  --- Waits (yielding) until the store has work: its pollfd is readable or
  -- its timeout passed. Then call store:step() and serve store:ready().
  function A.wait(store, timeout)
    local t = raw.store.timeout(store)
    if timeout and (not t or timeout < t) then
      t = timeout
    end
    wait(backend, raw.store.pollfd(store), t)
  end
  return A
end

return M
