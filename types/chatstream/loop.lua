---@meta chatstream.loop
-- LuaLS annotations of chatstream.loop (never loaded at runtime).

---@class chatstream.LoopBackend
---@field can_yield fun(): boolean
---@field wait fun(fd: integer, timeout?: number)
---@field new_turn fun(): {take: fun(self), give: fun(self)}
---@field pause fun()
---@field forget? fun(fd: integer)

---@class chatstream.loop
local loop = {}

---@param backend chatstream.LoopBackend
---@return chatstream.Adapter
function loop.adapter(backend) end

---An adapter module: open, close, wait, and chatstream's functions through __index.
---@class chatstream.Adapter: chatstream
local Adapter = {}

---@param opts? string|chatstream.OpenOptions
---@return chatstream.Store? store
---@return string? err
---@return chatstream.Code? code
function Adapter.open(opts) end

---@param store chatstream.Store
function Adapter.close(store) end

---@param store chatstream.Store
---@param timeout? number
function Adapter.wait(store, timeout) end

return loop
