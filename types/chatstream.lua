---@meta chatstream
-- LuaLS type annotations of require("chatstream") for editors (add this
-- directory to `workspace.library`). Never loaded at runtime: the module is
-- lua/chatstream/init.lua over the C module chatstream.core. The reference
-- (make docs, doc/) says the same in prose; spec/docs_spec.lua checks both
-- against the loaded module.

---@alias chatstream.Strategy "watermark"|"rescan"|"last_id"
---@alias chatstream.Status "waiting"|"pending"|"running"|"paused"|"completed"|"error"|"requires_action"
---@alias chatstream.Role "system"|"user"|"assistant"|"tool"
---@alias chatstream.Code "EINVAL"|"ESTATE"|"ENOTFOUND"|"EAUTH"|"EBACKEND"|"EUNKNOWN"|"EFULL"|"ETIMEDOUT"|"ECLOSED"
---@alias chatstream.Event chatstream.MessageEvent|chatstream.StatusEvent|chatstream.QueueEvent|chatstream.PartEvent|chatstream.TruncateEvent

---@class chatstream.OpenOptions
---@field memory? chatstream.MemoryDB a shared memory database (excludes dsn)
---@field dsn? string PostgreSQL URI or conninfo
---@field schema? string PostgreSQL schema (default "chatstream"; needs dsn)
---@field cache_size? integer messages cached per chat (default 256)
---@field queue_size? integer pending notifications per subscription (default 1024)
---@field max_chats? integer chats whose cache the store keeps (default 1024)
---@field page_size? integer messages a DB pass reads at most (default 500)
---@field max_queue? integer items a chat's queue holds (default 20)
---@field poll_interval? number backstop poll seconds, 0 = off
---@field query_timeout? number seconds one statement may take (default 30)
---@field stale_after? number seconds after which a heartbeat is stale (default 30)
---@field action_timeout? number seconds a chat may stay in requires_action (default 300)
---@field notify_bodies? boolean plain appends' notifications carry the message (default true)
---@field share_events? boolean subscriptions share message event tables
---@field authorize? fun(actor: string, chat: {id: integer, owner: string, title: string}, op: string): boolean?, string?

---@class chatstream.Message
---@field role chatstream.Role
---@field content string
---@field tool_calls? string[] an assistant message's tool call IDs
---@field tool_call_id? string the call a tool message answers

---@class chatstream.MessageEvent
---@field kind "message"
---@field chat_id integer
---@field id integer
---@field prev_id integer the chat's previous message ID, 0 for the first
---@field role chatstream.Role
---@field content string
---@field cursor integer the resume point just after this message
---@field tool_calls? string[]
---@field tool_call_id? string

---@class chatstream.StatusEvent
---@field kind "status"
---@field chat_id integer
---@field status chatstream.Status
---@field version integer
---@field error? string the recorded error
---@field archived? true

---@class chatstream.QueueItem
---@field id integer
---@field content string
---@field actor? string
---@field created_at number seconds since the Unix epoch

---@class chatstream.QueueEvent
---@field kind "queue"
---@field chat_id integer
---@field items chatstream.QueueItem[]

---@class chatstream.PartEvent
---@field kind "part"
---@field chat_id integer
---@field text string
---@field after integer the chat's last message ID when it was published

---@class chatstream.TruncateEvent
---@field kind "truncate"
---@field chat_id integer
---@field after integer the last message ID kept (an edit soft-deleted the rest)
---@field history integer edits that have cut the chat's history, this one included
---@field cursor integer the resume point once the cut is handed over

---@class chatstream.Chat
---@field id integer
---@field owner string
---@field title string
---@field status chatstream.Status
---@field version integer
---@field last_message_id integer
---@field archived boolean
---@field history? integer edits that cut the chat's history (once edit lands)
---@field worker? string
---@field interrupted_worker? string
---@field heartbeat_age? number
---@field last_error? string

---@class chatstream
---@field _VERSION string
---@field strategies chatstream.Strategy[]
local chatstream = {}

---Opens a store: none (memory), a DSN string, or the options table.
---@param opts? string|chatstream.OpenOptions
---@return chatstream.Store? store
---@return string? err "CODE: detail"
---@return chatstream.Code? code
function chatstream.open(opts) end

---A new shared in-memory database.
---@return chatstream.MemoryDB
function chatstream.memory() end

---The wall clock in seconds (sub-microsecond).
---@return number
function chatstream.now() end

---Sleeps 0 to 86400 seconds.
---@param seconds number
function chatstream.sleep(seconds) end

---One line describing an event.
---@param ev chatstream.Event
---@return string
function chatstream.format_event(ev) end

---@class chatstream.Store
local Store = {}

---@param opts? {owner?: string, title?: string, idempotency_key?: string}
---@return integer? chat_id
---@return string? err
---@return chatstream.Code? code
function Store:create_chat(opts) end

---@param chat_id integer
---@param msgs chatstream.Message|chatstream.Message[]
---@param opts? {actor?: string, worker?: string, idempotency_key?: string}
---@return integer[]? ids
---@return string? err
---@return chatstream.Code? code
function Store:append(chat_id, msgs, opts) end

---@param reqs {[1]: integer, [2]: chatstream.Message}[]
---@return (integer|false)[]? ids
---@return table<integer, {[1]: string, [2]: chatstream.Code}>|string|nil errors_or_err
---@return chatstream.Code? code
function Store:append_many(reqs) end

---@param chat_id integer
---@param msgs chatstream.Message|chatstream.Message[]
---@param opts? {actor?: string, worker?: string}
---@return chatstream.Publish? pub
---@return string? err
---@return chatstream.Code? code
function Store:prepare(chat_id, msgs, opts) end

---@param chat_id integer
---@param opts? {after?: integer, strategy?: chatstream.Strategy, ordered?: boolean, actor?: string}
---@return chatstream.Subscription? sub
---@return string? err
---@return chatstream.Code? code
function Store:subscribe(chat_id, opts) end

---for ev in store:stream(chat_id, opts, timeout): its own subscription, closed with the loop.
---@param chat_id integer
---@param opts? {after?: integer, strategy?: chatstream.Strategy, ordered?: boolean, actor?: string}
---@param timeout? number
---@return fun(sub: chatstream.Subscription): chatstream.Event? iter
---@return chatstream.Subscription state
---@return nil control
---@return chatstream.Subscription closing
function Store:stream(chat_id, opts, timeout) end

function Store:close() end

---@return table<string, integer|number|string>
function Store:stats() end

---@return true? ok
---@return string? err
---@return chatstream.Code? code
function Store:migrate() end

---@return integer? pid
function Store:listener_pid() end

---@return "memory"|"postgresql"
function Store:kind() end

---@param timeout? number
---@return integer? received
---@return string? err
---@return chatstream.Code? code
function Store:step(timeout) end

---@return integer? fd
function Store:pollfd() end

---@return integer? fd
function Store:fd() end

---@return "r"
function Store:events() end

---@return number? seconds
function Store:timeout() end

---@return chatstream.Subscription[]
function Store:ready() end

---@return integer? fd
function Store:notify_fd() end

---@return integer|false|nil routed
---@return string? err
---@return chatstream.Code? code
function Store:try_step() end

---@param fn function
---@param ... any
---@return boolean done
---@return any ...
function Store:job(fn, ...) end

---@param fn function
---@param ... any
---@return boolean done
---@return any ...
function Store:job_write(fn, ...) end

---@return boolean done
---@return any ...
function Store:resume() end

---@return integer fd
function Store:job_fd() end

---@param chat_id integer
---@param opts? {actor?: string}
---@return chatstream.Chat? chat
---@return string? err
---@return chatstream.Code? code
function Store:chat(chat_id, opts) end

---@param chat_id integer
---@param msg {content: string, role?: "user", actor?: string, idempotency_key?: string}
---@return integer? id
---@return boolean|string|nil queued_or_err
---@return chatstream.Code? code
function Store:send(chat_id, msg) end

---@param chat_id integer
---@param opts? {actor?: string}
---@return chatstream.QueueItem[]? items
---@return string? err
---@return chatstream.Code? code
function Store:queued(chat_id, opts) end

---@param chat_id integer
---@param queued_id integer
---@param opts? {actor?: string}
---@return true? ok
---@return string? err
---@return chatstream.Code? code
function Store:delete_queued(chat_id, queued_id, opts) end

---@param chat_id integer
---@param queued_id integer
---@param opts? {actor?: string}
---@return true? ok
---@return string? err
---@return chatstream.Code? code
function Store:move_queued(chat_id, queued_id, opts) end

---@param chat_id integer
---@param queued_id integer
---@param opts? {actor?: string, prepare?: boolean}
---@return integer[]|chatstream.Publish|nil ids_or_pub
---@return string? err
---@return chatstream.Code? code
function Store:promote_queued(chat_id, queued_id, opts) end

---@param opts {worker: string, limit?: integer, stale_after?: number}
---@return integer[]? chat_ids
---@return string? err
---@return chatstream.Code? code
function Store:acquire(opts) end

---@param chat_id integer
---@param worker string
---@return boolean|nil held
---@return string|nil status_or_err
---@return chatstream.Code? code
function Store:heartbeat(chat_id, worker) end

---@param chat_id integer
---@param status chatstream.Status
---@param opts? {worker?: string, actor?: string, error?: string}
---@return true? ok
---@return string? final_or_err
---@return chatstream.Code? code
function Store:finish(chat_id, status, opts) end

---@param chat_id integer
---@param opts? {actor?: string}
---@return chatstream.Chat? chat
---@return string? err
---@return chatstream.Code? code
function Store:interrupt(chat_id, opts) end

---@param opts? {limit?: integer}
---@return {expired: integer, revived: integer, released: integer, promoted: integer}? counts
---@return string? err
---@return chatstream.Code? code
function Store:recover(opts) end

---@param chat_id integer
---@param opts? {actor?: string}
---@return chatstream.Chat? chat
---@return string? err
---@return chatstream.Code? code
function Store:archive(chat_id, opts) end

---@param chat_id integer
---@param opts? {actor?: string}
---@return chatstream.Chat? chat
---@return string? err
---@return chatstream.Code? code
function Store:unarchive(chat_id, opts) end

---@param chat_id integer
---@param results {tool_call_id: string, content: string}[]
---@param opts? {actor?: string}
---@return integer[]? ids
---@return string? err
---@return chatstream.Code? code
function Store:submit_tool_results(chat_id, results, opts) end

---@param chat_id integer
---@param text string
---@param opts? {actor?: string, worker?: string}
---@return true? ok
---@return string? err
---@return chatstream.Code? code
function Store:publish_part(chat_id, text, opts) end

---Edits a user message: a truncate event, then the new message.
---@param chat_id integer
---@param message_id integer
---@param opts {content: string, actor?: string, prepare?: boolean}
---@return integer|chatstream.Publish|nil new_id_or_pub
---@return string? err
---@return chatstream.Code? code
function Store:edit(chat_id, message_id, opts) end

---@class chatstream.Subscription
local Subscription = {}

---@param timeout? number
---@return chatstream.Event? ev
---@return string? err "timeout" or "CODE: detail"
---@return chatstream.Code? code
function Subscription:next(timeout) end

---@param timeout? number
---@return fun(sub: chatstream.Subscription): chatstream.Event? iter
---@return chatstream.Subscription state
---@return nil control
function Subscription:events(timeout) end

---@return integer cursor
function Subscription:cursor() end

---@return integer bytes
function Subscription:delivered_bytes() end

---@return chatstream.Event|false|nil ev nil: nothing now; false: needs the server
function Subscription:try() end

---@return chatstream.Store
function Subscription:store() end

function Subscription:close() end

---@class chatstream.Publish
local Publish = {}

---@return integer[]? ids
---@return string? err
---@return chatstream.Code? code
function Publish:commit() end

---@param i? integer
---@return true? ok
---@return string? err
---@return chatstream.Code? code
function Publish:cache(i) end

---@param i? integer
---@return true? ok
---@return string? err
---@return chatstream.Code? code
function Publish:notify(i) end

---@return true? ok
---@return string? err
---@return chatstream.Code? code
function Publish:publish() end

---@return chatstream.Store
function Publish:store() end

function Publish:close() end

---@class chatstream.MemoryDB
local MemoryDB = {}

---@param n integer
---@return chatstream.MemoryDB
function MemoryDB:fail_queries(n) end

---@param n integer
---@return chatstream.MemoryDB
function MemoryDB:drop_notifies(n) end

function MemoryDB:close() end

return chatstream
