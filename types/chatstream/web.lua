---@meta chatstream.web
-- LuaLS annotations of chatstream.web (never loaded at runtime).

---@class chatstream.web
---@field DEFAULTS {host: string, port: integer, heartbeat: number, retry: integer, max_body: integer, max_pending: integer, write_timeout: number, owner: string}
local web = {}

---@param opts {store: chatstream.Store, cq?: table, log?: fun(line: string), host?: string, port?: integer, heartbeat?: number, retry?: integer, max_body?: integer, max_pending?: integer, write_timeout?: number, owner?: string}
---@return chatstream.web.Server? srv
---@return any err
function web.listen(opts) end

---@class chatstream.web.Server
---@field cq table its cqueues controller
---@field store chatstream.Store
---@field stats {streams: integer, let_go: integer, errors: integer}
local Server = {}

---@return integer port
function Server:port() end

---@return true
function Server:loop() end

function Server:close() end

return web
