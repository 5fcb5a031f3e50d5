---@meta chatstream.core
-- LuaLS annotations of the C module chatstream.core (never loaded at runtime).

---@class chatstream.core
---@field _VERSION string
---@field Store chatstream.Store the Store methods table
---@field Subscription chatstream.Subscription the Subscription methods table
---@field Publish chatstream.Publish the Publish methods table
local core = {}

---@param opts? chatstream.OpenOptions
---@return chatstream.Store? store
---@return string? err
---@return chatstream.Code? code
function core.open(opts) end

---@return chatstream.MemoryDB
function core.memory() end

---@return chatstream.Engine
function core.engine() end

---@return number
function core.now() end

---@param seconds number
function core.sleep(seconds) end

---@class chatstream.Engine
local Engine = {}

---@param fn function
---@param ... any
---@return boolean done
---@return any ...
function Engine:job(fn, ...) end

---@return boolean done
---@return any ...
function Engine:resume() end

---@return integer fd
function Engine:fd() end

function Engine:close() end

return core
