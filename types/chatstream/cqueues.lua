---@meta chatstream.cqueues
-- LuaLS annotations of chatstream.cqueues (never loaded at runtime).

---@class chatstream.cqueues: chatstream.Adapter
local M = {}

---@param opts? string|chatstream.OpenOptions
---@return chatstream.Store? store
---@return string? err
---@return chatstream.Code? code
function M.open(opts) end

---@param store chatstream.Store
function M.close(store) end

---@param store chatstream.Store
---@param timeout? number
function M.wait(store, timeout) end

return M
