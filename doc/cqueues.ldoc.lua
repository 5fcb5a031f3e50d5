--- chatstream inside a cqueues loop (lua/chatstream/cqueues.lua, over `chatstream.loop`).
--
-- Called from a coroutine the controller runs (cq:wrap), a call that would wait for the server yields to the loop
-- (its statement runs on the store's engine thread); `sub:next(timeout)`
-- yields until the store has something. Called anywhere else, every call
-- blocks as chatstream's do. Every other function of `chatstream` is
-- reachable through this module (`__index`). LDoc source only, never required.
-- @module chatstream.cqueues

--- Opens a store as `chatstream.open` does (inside the loop, the connects
-- yield too), served by this loop.
-- @tparam[opt] string|table opts as `chatstream.open`'s
-- @return a `chatstream.Store`, or nil, message, code
-- @function open

--- Closes the store (after any call of it still under way) and forgets the
-- loop's watchers of its descriptors.
-- @param store a store this module opened (any store: closed as usual)
-- @function close

--- Yields until the store has work (its pollfd is readable or its timeout
-- passed); then call `store:step()` and serve `store:ready()`.
-- @param store the store
-- @tparam[opt] number timeout at most this many seconds
-- @function wait
