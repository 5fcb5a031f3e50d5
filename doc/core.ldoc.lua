--- The C module under `chatstream` (lua/core/*.c, `luaopen_chatstream_core`).
--
-- Programs use `chatstream`; the event-loop adapters and init.lua use this one
-- for the engine and the methods tables. LDoc source only, never required.
-- @module chatstream.core

--- Opens a store from an options table (no string DSN, no Lua-side key check:
-- `chatstream.open` adds those).
-- @tparam[opt] table opts as `chatstream.open`'s options
-- @return a `chatstream.Store`, or nil, message, code
-- @function open

--- A new shared memory database (as `chatstream.memory`).
-- @return a `chatstream.MemoryDB`
-- @function memory

--- An engine of its own, for a call made before there is a store (an event
-- loop's `open`).
-- @treturn Engine the engine
-- @function engine

--- The wall clock (as `chatstream.now`).
-- @treturn number seconds since the Unix epoch
-- @function now

--- Sleeps (as `chatstream.sleep`).
-- @tparam number seconds 0 to 86400
-- @function sleep

--- `CS_VERSION`, e.g. "0.1.0".
-- @field _VERSION

--- The methods table (`__index`) of `chatstream.Store`, for methods written in Lua.
-- @field Store

--- The methods table of `chatstream.Subscription`.
-- @field Subscription

--- The methods table of `chatstream.Publish`.
-- @field Publish

--- An engine (`chatstream.Engine`): a thread that runs one call at a time and comes back where
-- the call would wait (see `chatstream.Store:job`).
-- @type Engine

--- Starts `fn(...)` on the engine.
-- @tparam function fn the call
-- @param ... its arguments
-- @treturn boolean false while it waits (wait on `fd`, then `resume`); true and the call's
-- results once it returned
-- @raise the call's own error; "job: a call is under way (resume it)"
-- @function Engine:job

--- Lets the call go on.
-- @treturn boolean as `job`
-- @function Engine:resume

--- The engine's descriptor: readable when a waiting call can go on.
-- @treturn integer the fd
-- @function Engine:fd

--- Finishes a call still under way (blocking), then frees the engine. Idempotent.
-- @function Engine:close
