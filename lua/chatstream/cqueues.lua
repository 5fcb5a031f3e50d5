-- chatstream.cqueues: chatstream inside a cqueues loop.
--
--   local cs = require("chatstream.cqueues")
--   local store = cs.open(opts)      -- as chatstream.open
--   cq:wrap(function() ... store:append(...) ... sub:next(5) ... end)
--
-- Called from a coroutine the loop runs, a call that would wait for the
-- server yields to the loop instead (its statement runs on the store's
-- engine thread); sub:next(timeout) yields until the store has
-- something. Called anywhere else, every call blocks as chatstream's do.
-- The store is itself a cqueues pollable (pollfd, events, timeout), so
-- cqueues.poll(store) waits until store:step() has work.
local cqueues = require("cqueues")
local condition = require("cqueues.condition")
local loop = require("chatstream.loop")

local backend = {}

function backend.can_yield()
  local _, inside = cqueues.running()
  return inside == true
end

function backend.wait(fd, timeout)
  cqueues.poll({ pollfd = fd, events = "r", timeout = timeout })
end

function backend.pause()
  cqueues.sleep(0)
end

-- A lock handed on in turn: take() yields while another coroutine holds it.
function backend.new_turn()
  local t = { busy = false, cv = condition.new() }
  function t.take(self)
    while self.busy do
      self.cv:wait()
    end
    self.busy = true
  end
  function t.give(self)
    self.busy = false
    self.cv:signal(1)
  end
  return t
end

return loop.adapter(backend)
