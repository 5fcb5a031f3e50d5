---@meta chatstream.agent
-- LuaLS annotations of chatstream.agent (never loaded at runtime).

---@alias chatstream.Agent fun(history: chatstream.MessageEvent[]): chatstream.Message[]

---@class chatstream.agent
local agent = {}

---@param history chatstream.MessageEvent[]
---@return chatstream.Message[]
function agent.scripted(history) end

---@param msgs table[]
---@return string[] call_ids
function agent.unresolved(msgs) end

---@param store chatstream.Store
---@param chat_id integer
---@return chatstream.MessageEvent[]
function agent.history(store, chat_id) end

---@param store chatstream.Store
---@param chat_id integer
---@param opts {worker: string, agent?: chatstream.Agent, stream?: boolean}
---@return chatstream.Status final
---@return integer[] ids
function agent.turn(store, chat_id, opts) end

---@param store chatstream.Store
---@param opts {worker: string, agent?: chatstream.Agent, stream?: boolean, limit?: integer, poll?: number, stale_after?: number, idle?: number, turns?: integer, on_turn?: fun(chat_id: integer, final: chatstream.Status, ids: integer[]), recover?: number|false}
---@return integer turns
function agent.run(store, opts) end

return agent
