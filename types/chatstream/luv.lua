---@meta chatstream.luv
-- LuaLS annotations of chatstream.luv (never loaded at runtime).

---@class chatstream.luv: chatstream.Adapter
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
