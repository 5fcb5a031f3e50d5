--- A worker loop for Lua agents (lua/chatstream/agent.lua).
--
-- An agent is a function from a chat's history (message events, ascending) to
-- the messages to append. LDoc source only, never required.
-- @module chatstream.agent
-- @usage local agent = require("chatstream.agent")
-- agent.run(store, {worker = "w1", agent = agent.scripted, idle = 5})

--- A deterministic agent for demos and specs: "/tool ..." asks the client to
-- run "client_tool" (call ID "call-<message id>"), "/calc ..." runs a server
-- tool (call and result in one turn), any other user message gets
-- "reply to: <text>", a tool result "the tool said: <result>".
-- @tparam {chatstream.message,...} history the chat's messages
-- @treturn {chatstream.Message,...} the messages to append
-- @function scripted

--- The tool calls of msgs that msgs do not answer (client tools).
-- @tparam {table,...} msgs messages or message events
-- @treturn {string,...} the call IDs, in order
-- @function unresolved

--- The chat's messages (a subscription's snapshot), ascending.
-- @tparam chatstream.Store store the store
-- @tparam integer chat_id the chat
-- @treturn {chatstream.message,...} the message events
-- @function history

--- One turn of the agent on a chat the worker holds: streams the last
-- assistant text as parts (word by word), appends the messages with
-- `{worker =}` and finishes (requires_action when a tool call is left open,
-- waiting otherwise). A worker that lost the chat meanwhile writes nothing.
-- @tparam chatstream.Store store the store
-- @tparam integer chat_id the chat
-- @tparam table opts `{worker = (required), agent = scripted, stream = true}`
-- @treturn string the status the chat ended the turn with
-- @treturn {integer,...} the IDs appended
-- @function turn

--- The worker loop: acquires pending chats and runs turns until idle for
-- `opts.idle` seconds (nil: forever) or `opts.turns` turns are done.
-- @tparam chatstream.Store store the store
-- @tparam table opts `worker` (required), `agent`, `stream`, `limit` (chats per
-- acquire, 1), `poll` (seconds between empty acquires, 0.02), `stale_after`,
-- `idle`, `turns`, `on_turn` (`function(chat_id, final_status, ids)`),
-- `recover` (seconds between `store:recover()` passes, 5; false: none)
-- @treturn integer the number of turns run
-- @function run
