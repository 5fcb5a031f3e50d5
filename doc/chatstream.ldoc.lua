--- A live chat message stream that loses nothing and delivers nothing twice.
--
-- `require("chatstream")` (lua/chatstream/init.lua over the C module
-- `chatstream.core`). This file is LDoc source only: it is never required
-- (`make docs` reads it; spec/docs_spec.lua checks it against the loaded
-- module).
--
-- Conventions of every handle and method:
--
-- * Misuse raises: a bad argument type, an unknown option key, a value out of
--   range, a closed handle ("attempt to use a closed store"), a call on a store
--   whose engine runs another coroutine's call ("store is busy: ..."), out of
--   memory ("not enough memory").
-- * A runtime failure returns `nil, "CODE: detail", "CODE"` (see `codes`); an
--   idle timeout is `nil, "timeout", "ETIMEDOUT"`. Errors inside a `for`
--   iterator are raised.
-- * IDs (chats, messages, queue items) are Lua integers.
-- * `close` is the same idempotent function as `__gc` and `__close`, so
--   `local x <close> = ...` works for every handle; `tostring` says
--   "(closed)" once closed.
--
-- @module chatstream
-- @license MIT

--- Functions
-- @section functions

--- Opens a store (a hub: its caches, its subscriptions, one listener).
--
-- * `open()`: an embedded memory store with a database of its own;
-- * `open{memory = db}`: a store on a shared `MemoryDB` (a replica with its own cache);
-- * `open("postgresql://...")` or `open{dsn = "..."}`: the PostgreSQL store (a libpq URI or
--   conninfo string). A connection where LISTEN cannot reach the listener (a pooler in
--   transaction mode) is refused here.
-- @tparam[opt] string|OpenOptions opts a DSN, or the options table
-- @treturn Store the store
-- @return[2] nil
-- @treturn[2] string "CODE: detail" (the DSN's password never appears)
-- @treturn[2] string the code
-- @codes EBACKEND (cannot connect, the listener probe failed), EINVAL
-- @raise on an unknown option key (checked in Lua before the core), a bad option value,
-- `dsn` with `memory`, `schema` without `dsn`
-- @function open

--- A new shared in-memory database; `open{memory = db}` gives it a hub.
-- Several stores on one database act as separate replicas (separate caches) in
-- one process.
-- @treturn MemoryDB the database
-- @raise "not enough memory"
-- @function memory

--- The wall clock in seconds since the Unix epoch, with sub-microsecond
-- resolution (for benchmarks and latencies across processes).
-- @treturn number seconds
-- @function now

--- Sleeps, with sub-millisecond resolution, whatever the stores do.
-- @tparam number seconds 0 to 86400
-- @raise when seconds is out of range
-- @function sleep

--- One line describing an event, for logs and examples: "message #5 user: hi",
-- "status pending (version 1)", "queue [#1 \"x\"]", "part \"delta\"", or
-- "event KIND" for any other kind.
-- @tparam message|status|queue|part ev an event table
-- @treturn string the line
-- @function format_event

--- Fields
-- @section fields

--- The module's version, the C core's (`CS_VERSION`), e.g. "0.1.0".
-- @field _VERSION

--- The merge strategies, in order: `{"watermark", "rescan", "last_id"}`.
-- `watermark` (the default) and `rescan` lose nothing; `last_id` is the lossy
-- algorithm kept for demos, specs and benchmarks.
-- @field strategies

--- Options
-- @section options

--- The options table of `open` (every key optional; an unknown key raises).
-- @table OpenOptions
-- @field memory a `MemoryDB`: the store opens on it (excludes `dsn`)
-- @field dsn a PostgreSQL URI or conninfo string
-- @field schema PostgreSQL schema (default "chatstream"; a lower-case identifier of at most 38
-- characters; needs `dsn`)
-- @field cache_size messages cached per chat (integer >= 1, default 256, at most 2^20)
-- @field queue_size pending notifications per subscription before it resyncs (default 1024)
-- @field max_chats chats whose cache the store keeps (default 1024)
-- @field page_size messages a DB pass reads at most (default 500)
-- @field max_queue items a chat's queue holds; one more is `EFULL` (default 20, at most 1000000)
-- @field poll_interval seconds between backstop polls, 0 = off (default 10 on PostgreSQL, off on memory)
-- @field query_timeout seconds one statement may take before it is cancelled (> 0, <= 86400, default 30)
-- @field stale_after seconds after which a worker's heartbeat is stale (default 30)
-- @field action_timeout seconds a chat may stay in `requires_action` before it goes to `error`
-- (default 300)
-- @field notify_bodies boolean: plain appends' notifications carry the message (default true)
-- @field share_events boolean: subscriptions of the store that get the same message at the same
-- cursor get the same event table (read such events, never change them)
-- @field authorize `function(actor, chat, op)` -> true to allow, or false/nil and a reason;
-- `chat` is `{id, owner, title}`, `op` the operation ("subscribe", "send", "append", ...);
-- an error refuses. Without it, an actor must be the chat's owner.

--- A message to write (`append`, `prepare`, `append_many`).
-- @table Message
-- @field role "system", "user", "assistant" or "tool"
-- @field content string: UTF-8 text without NUL, at most 64 MiB
-- @field tool_calls on an assistant message: a list of call IDs (1 to 128 bytes of
-- `[A-Za-z0-9_.:-]`, at most 64)
-- @field tool_call_id on a tool message: the ID of the call it answers

--- Events
-- A subscription hands over event tables; every one has `kind` and `chat_id`.
-- @section events

--- A durable message.
-- @table message
-- @field kind "message"
-- @field chat_id the chat
-- @field id the message's ID (one sequence for all chats: a chat's IDs rise, with holes)
-- @field prev_id the chat's previous message ID (0 for the first)
-- @field role "system", "user", "assistant" or "tool"
-- @field content the text
-- @field cursor the resume point just after this message (`subscribe{after = cursor}` loses
-- nothing; an SSE `id:`)
-- @field tool_calls an assistant message's tool call IDs (a list), when it has any
-- @field tool_call_id a tool message's call ID, when it has one

--- The chat's status: first in a snapshot, then on every change. A subscriber drops a status
-- older than the last one it delivered.
-- @table status
-- @field kind "status"
-- @field chat_id the chat
-- @field status "waiting", "pending", "running", "paused", "completed", "error" or
-- "requires_action"
-- @field version the chat's version, bumped with every change
-- @field error the recorded error (finish with an error text), when there is one
-- @field archived true for an archived chat (absent otherwise)

--- The chat's whole queue, after every change (in a snapshot when not empty).
-- @table queue
-- @field kind "queue"
-- @field chat_id the chat
-- @field items a list of `{id, content, actor, created_at}` (actor absent when sent without
-- one; created_at in seconds since the Unix epoch), queue order

--- A non-durable streaming delta (`Store:publish_part`). A late joiner first gets the parts of
-- the turn in progress as one part event.
-- @table part
-- @field kind "part"
-- @field chat_id the chat
-- @field text the delta
-- @field after the chat's last message ID when it was published

--- An edit cut the chat's history (`Store:edit`): every message with an ID above `after` is
-- gone (soft-deleted); the edited content follows as a new message event. A reader drops what
-- it shows above `after`.
-- @table truncate
-- @field kind "truncate"
-- @field chat_id the chat
-- @field after the last message ID kept (the edited message's prev_id)
-- @field history how many edits have cut the chat's history, this one included
-- @field cursor the subscription's resume point once the cut is handed over

--- Failure codes
-- @section codes

--- The codes of `nil, "CODE: detail", "CODE"` failures (`cs_errname` of the core's `CS_E*`).
-- @table codes
-- @field EINVAL a bad argument the core found (a cursor past the chat's end, invalid UTF-8, an
-- idempotency key reused for another write, a tool call ID that is not open, a status `finish`
-- never sets)
-- @field ESTATE the chat's state does not allow it (not running on this worker, archived, an
-- invalid transition): nothing was written
-- @field ENOTFOUND no such chat (or queue item)
-- @field EAUTH the actor may not (refused before anything of the chat is read)
-- @field EBACKEND the store failed: the write did not happen (not sent, refused, cancelled)
-- @field EUNKNOWN a write was sent but its answer was lost: it may have committed; retry with
-- the same idempotency key
-- @field EFULL the chat's queue holds `max_queue` items: a send that would queue wrote nothing
-- @field ETIMEDOUT nothing arrived within the timeout (`nil, "timeout", "ETIMEDOUT"`)
-- @field ECLOSED the handle's store is closed

--- Store
-- @section Store

--- A store handle (`chatstream.Store`): per-chat caches, the subscriptions and one listener.
-- Made by `open`. Its methods table is also `chatstream.core.Store`.
-- @type Store

--- Creates a chat (status `waiting`, version 0).
-- @tparam[opt] table opts `{owner =, title =, idempotency_key =}`: owner at most 255 bytes,
-- title at most 1023; a key makes a retry return the owner's chat made with it
-- @treturn integer the chat ID
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EINVAL, EBACKEND, EUNKNOWN
-- @function Store:create_chat

--- Appends one message or a list (1 to 4096) in one transaction and publishes them (cache,
-- then notifications).
-- @tparam integer chat_id the chat
-- @tparam Message|{Message,...} msgs a message or a list of messages
-- @tparam[opt] table opts `{actor =}` (checked against the owner), `{worker =}` (committed only
-- while the chat runs on that worker, or was interrupted while it did; excludes actor),
-- `{idempotency_key =}` (1 to 255 bytes: a retry returns the first call's ids)
-- @treturn {integer,...} the new message IDs, in order
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EINVAL, ENOTFOUND, EAUTH, ESTATE (worker lost the chat), EBACKEND, EUNKNOWN
-- @function Store:append

--- Appends one message to each of several chats, each its own transaction (one failing leaves
-- the others), several in flight at once (PostgreSQL: pipeline mode). Trusted (no actor).
-- @tparam {{integer,Message},...} reqs 1 to 4096 `{chat_id, message}` entries
-- @treturn {integer|false,...} ids: each entry's message ID, or false when it failed
-- @treturn table errors: for each failed entry i, `{message, code}` (code "EUNKNOWN": sent,
-- answer lost)
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EBACKEND (the call itself)
-- @function Store:append_many

--- Prepares a stepped publish: nothing is written until `Publish:commit`. Specs use it to
-- replay races step by step.
-- @tparam integer chat_id the chat
-- @tparam Message|{Message,...} msgs the messages
-- @tparam[opt] table opts `{actor =}` or `{worker =}`, as `append`'s
-- @treturn Publish the publish
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EINVAL, ENOTFOUND, EAUTH
-- @function Store:prepare

--- Opens a subscription: registered on the listener first, then the snapshot (status, queue,
-- messages after `after`), then live events.
-- @tparam integer chat_id the chat
-- @tparam[opt] table opts `{after = 0, strategy = "watermark"|"rescan"|"last_id", ordered =
-- true (watermark only), actor =}`
-- @treturn Subscription the subscription
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, EINVAL (a cursor beyond the chat's last message), EBACKEND
-- @raise on an unknown strategy, `ordered` with another strategy
-- @function Store:subscribe

--- `for ev in store:stream(chat_id, opts, timeout) do ... end`: opens a subscription (opts as
-- `subscribe`'s) and iterates its events until it is idle for `timeout` seconds. The
-- subscription is the loop's closing value, so it is closed when the loop ends, by break or
-- error too. (Lua, in init.lua.)
-- @tparam integer chat_id the chat
-- @tparam[opt] table opts as `subscribe`'s
-- @tparam[opt] number timeout idle seconds that end the loop (default 0)
-- @treturn function the iterator
-- @treturn Subscription the state
-- @return nil
-- @treturn Subscription the closing value
-- @raise when the subscription cannot be opened (the failure's message)
-- @function Store:stream

--- Closes the store (after any call of it still under way on its engine). Its subscriptions
-- and publishes are detached: their calls then fail or raise. Idempotent.
-- @raise inside the store's own authorizer
-- @function Store:close

--- The store's counters.
-- @treturn table `notifications, malformed, parts, parts_dropped, auth_checks, auth_refusals,
-- shared_passes, bodies, listener_deaf, steps, cached_messages, warnings, last_warning,
-- notify_queue_usage (PostgreSQL, 0 to 1, when known), queries, query_errors, writes,
-- publish_errors, cache_hits, cache_misses, db_passes, delivered, resyncs, reconnects, polls,
-- cached_chats`
-- @function Store:stats

--- Creates or upgrades the PostgreSQL schema (versioned, under an advisory lock: safe from
-- many processes at once). Nothing to do on the memory store.
-- @treturn boolean true
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EBACKEND
-- @function Store:migrate

--- PostgreSQL: the listener connection's server process ID (`pg_backend_pid()`).
-- @treturn integer|nil the pid, nil without a listener (the memory store)
-- @function Store:listener_pid

--- The store's kind.
-- @treturn string "memory" or "postgresql"
-- @function Store:kind

--- Receives notifications and routes them to the subscriptions; with a timeout, first waits
-- up to that long for the listener to have some (the memory store never waits).
-- @tparam[opt] number timeout seconds (default 0)
-- @treturn integer the number of notifications received
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EBACKEND
-- @function Store:step

--- The pollable's descriptor: the same for the store's whole life, readable when the store has
-- work (`step`, or a ready subscription). `fd` is its alias.
-- @treturn integer|nil the fd (nil only if the store could not get one)
-- @function Store:pollfd

--- Alias of `pollfd`.
-- @treturn integer|nil the fd
-- @function Store:fd

--- What a loop polls `pollfd` for (cqueues' pollable protocol).
-- @treturn string "r"
-- @function Store:events

--- Seconds until the store needs a step although its fd stays quiet (the backstop poll, a
-- retry), 0 if now.
-- @treturn number|nil seconds, or nil for never
-- @function Store:timeout

--- The subscriptions with work, in the order they got it (a subscription being collected is
-- left out).
-- @treturn {Subscription,...} the list
-- @function Store:ready

--- The store's notification descriptor: readable while notifications wait to be routed (what
-- one reader waits on; other subscriptions' events keep `pollfd` readable).
-- @treturn integer|nil the fd
-- @function Store:notify_fd

--- `step` without asking the server: routes what the listener buffered.
-- @treturn integer|boolean the number routed, or false when a step that may wait (the backstop
-- poll) is due: run `step` then, on the engine
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @raise while a call of the store that is not a write runs on its engine
-- @function Store:try_step

--- Starts `fn(...)` on the store's engine thread, in a Lua thread of its own; where it would
-- wait for the server it comes back, and the caller's loop waits on `job_fd` and calls
-- `resume`.
-- @tparam function fn the call
-- @param ... its arguments
-- @treturn boolean false while the call waits; true, then its results, once it returned
-- @raise the call's own error; "job: a call is under way (resume it)"
-- @function Store:job

--- `job` for a call that only writes (append, send, the lifecycle): while it waits,
-- `Subscription:try` and `try_step` may run beside it.
-- @tparam function fn the call
-- @param ... its arguments
-- @treturn boolean false while it waits; true and its results once it returned
-- @function Store:job_write

--- Lets the engine's call go on once its wait is over.
-- @treturn boolean as `job`: false, or true and the call's results
-- @raise the call's own error
-- @function Store:resume

--- The engine's descriptor: readable when a waiting call can go on.
-- @treturn integer the fd
-- @function Store:job_fd

--- The chat's metadata and state.
-- @tparam integer chat_id the chat
-- @tparam[opt] table opts `{actor =}`
-- @treturn table `{id, owner, title, status, version, last_message_id, archived}` (and
-- `history`, the number of edits, once edit lands), plus
-- `worker` and `heartbeat_age` while a worker holds it (`interrupted_worker` instead when
-- waiting), `last_error` when one is recorded
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, EBACKEND
-- @function Store:chat

--- Sends a user message: on an idle chat (waiting, completed, error) it is appended and the
-- chat set pending in one transaction; on a busy one (pending, running, requires_action,
-- paused), or while the queue is not empty, it is queued.
-- @tparam integer chat_id the chat
-- @tparam table msg `{content =, role = "user" (only), actor =, idempotency_key =}`
-- @treturn integer the message ID, or the queue item's ID when queued
-- @treturn boolean queued
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EFULL (max_queue), ESTATE (archived), ENOTFOUND, EAUTH, EINVAL, EBACKEND, EUNKNOWN
-- @function Store:send

--- The chat's queue.
-- @tparam integer chat_id the chat
-- @tparam[opt] table opts `{actor =}`
-- @treturn {table,...} `{id, content, actor, created_at}` items in queue order
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, EBACKEND
-- @function Store:queued

--- Deletes a queue item.
-- @tparam integer chat_id the chat
-- @tparam integer queued_id the item
-- @tparam[opt] table opts `{actor =}`
-- @treturn boolean true
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND (no such chat or item), EAUTH, EBACKEND
-- @function Store:delete_queued

--- Moves a queue item to the front.
-- @tparam integer chat_id the chat
-- @tparam integer queued_id the item
-- @tparam[opt] table opts `{actor =}`
-- @treturn boolean true
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, EBACKEND
-- @function Store:move_queued

--- Promotes a queue item. On requires_action: one synthetic tool result per unanswered tool
-- call, then the user message, and pending, in one transaction. On a running chat with a
-- fresh worker: the item moves to the front and the chat goes waiting (the worker is
-- interrupted; its finish promotes the head). On an idle chat or with a stale worker: at
-- once.
-- @tparam integer chat_id the chat
-- @tparam integer queued_id the item
-- @tparam[opt] table opts `{actor =, prepare = true}`: prepare returns a stepped publish
-- @treturn {integer,...}|Publish the inserted message IDs (empty when it only moved the item),
-- or the publish with prepare
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, ESTATE (archived), EAUTH, EBACKEND, EUNKNOWN
-- @function Store:promote_queued

--- Takes pending chats (and those of workers silent for `stale_after`) and sets them running
-- on the worker; chats past `action_timeout` in requires_action go to error on the way.
-- @tparam table opts `{worker = (required), limit = 1 (1 to 1024), stale_after = seconds}`
-- @treturn {integer,...} the chat IDs now running on the worker
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EINVAL (a bad worker name), EBACKEND
-- @function Store:acquire

--- The worker's heartbeat.
-- @tparam integer chat_id the chat
-- @tparam string worker the worker
-- @treturn boolean true while the chat still runs on the worker
-- @treturn[2] boolean false: lost (interrupted, finished, taken over)
-- @treturn[2] string the chat's status
-- @return[3] nil
-- @treturn[3] string message
-- @treturn[3] string code
-- @codes ENOTFOUND, EINVAL (a bad worker name), EBACKEND
-- @function Store:heartbeat

--- Ends a worker's turn. Ending waiting or completed (or after an interruption) with a queue
-- promotes its head: the chat ends pending.
-- @tparam integer chat_id the chat
-- @tparam string status "waiting", "completed", "error", "paused" or "requires_action"
-- @tparam[opt] table opts `{worker =, actor =, error = text}` (error: with status "error" only,
-- at most 1024 bytes, recorded as last_error)
-- @treturn boolean true
-- @treturn string the final status
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ESTATE (not running on the worker), EINVAL (a status finish never sets, an error with
-- another status), ENOTFOUND, EAUTH, EBACKEND
-- @raise on a status name that does not exist
-- @function Store:finish

--- Interrupts the chat's turn: running goes waiting (the worker kept as the interrupted one; it
-- may still append its partial output and finish), pending goes waiting, other statuses are
-- left alone.
-- @tparam integer chat_id the chat
-- @tparam[opt] table opts `{actor =}`
-- @treturn table the chat, as `chat` returns it
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, EBACKEND
-- @function Store:interrupt

--- The periodic recovery pass: requires_action past action_timeout goes to error; interrupted
-- chats of silent workers are revived; running chats of silent workers go pending; idle chats
-- with a queue get its head promoted.
-- @tparam[opt] table opts `{limit = n}`: at most n chats of each kind (1 to 1024, default 1024)
-- @treturn table `{expired, revived, released, promoted}` counts
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EBACKEND
-- @function Store:recover

--- Archives the chat (version + 1, status events say `archived = true`): send, promote_queued
-- and submit_tool_results are refused, the queue is kept, a running turn is interrupted.
-- @tparam integer chat_id the chat
-- @tparam[opt] table opts `{actor =}`
-- @treturn table the chat, as `chat` returns it
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, EBACKEND
-- @function Store:archive

--- Undoes `archive` (the same state again changes nothing).
-- @tparam integer chat_id the chat
-- @tparam[opt] table opts `{actor =}`
-- @treturn table the chat, as `chat` returns it
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, EBACKEND
-- @function Store:unarchive

--- Submits the results of a requires_action chat's client tool calls: appended as tool messages
-- and the chat set pending, in one transaction.
-- @tparam integer chat_id the chat
-- @tparam {table,...} results 1 to 4096 `{tool_call_id =, content =}`
-- @tparam[opt] table opts `{actor =}`
-- @treturn {integer,...} the messages' IDs
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EINVAL (a call ID that is not open), ESTATE (another status, archived), ENOTFOUND,
-- EAUTH, EBACKEND
-- @function Store:submit_tool_results

--- Sends a non-durable delta to every subscriber of the chat, in every process (split on UTF-8
-- boundaries when longer than one notification).
-- @tparam integer chat_id the chat
-- @tparam string text the delta
-- @tparam[opt] table opts `{actor =}` or `{worker =}`: with a worker, only while the chat runs
-- on it (or was interrupted while it did), so a worker an edit or a takeover let go streams
-- nothing into the next turn
-- @treturn boolean true
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ENOTFOUND, EAUTH, ESTATE (not this worker's chat), EBACKEND
-- @function Store:publish_part

--- Edits a user message: soft-deletes it and every later message of the chat, appends the
-- edited content as a new user message after the edited one's prev_id, clears the queue, lets
-- a worker on the chat go (its appends are refused from then on: ESTATE) and sets the chat
-- pending, in one transaction; the chat's `history` counts one more. Subscribers get a
-- `truncate` event (`after` = the edited message's prev_id), then the new message.
-- @tparam integer chat_id the chat
-- @tparam integer message_id the user message to edit
-- @tparam table opts `{content = (required), actor =, prepare = true}`: prepare returns a
-- stepped publish whose commit is the edit's transaction and whose notify sends the truncate
-- hint, then the new message's
-- @treturn integer|Publish the new message's ID, or the publish with prepare
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EINVAL (no such live user message in the chat), ESTATE (archived), ENOTFOUND, EAUTH,
-- EBACKEND
-- @function Store:edit

--- Subscription
-- @section Subscription

--- One reader of one chat (`chatstream.Subscription`): the snapshot, then live events. Keeps
-- its store alive. Its methods table is also `chatstream.core.Subscription`.
-- @type Subscription

--- The next event, waiting up to `timeout` seconds.
-- @tparam[opt] number timeout seconds (default 0: no wait)
-- @treturn message|status|queue|part|truncate the event
-- @return[2] nil
-- @treturn[2] string "timeout"
-- @treturn[2] string "ETIMEDOUT"
-- @return[3] nil
-- @treturn[3] string message
-- @treturn[3] string code
-- @codes ETIMEDOUT, EBACKEND
-- @raise on a subscription of a closed store, inside another next of the same subscription
-- @function Subscription:next

--- `for ev in sub:events(timeout) do ... end`: the events until the subscription is idle for
-- `timeout` seconds; a failure inside the loop raises.
-- @tparam[opt] number timeout idle seconds (default 0)
-- @treturn function the iterator
-- @treturn Subscription the subscription
-- @return nil
-- @function Subscription:events

--- The watermark over returned messages: every message of the chat with an ID at or below it
-- was returned; `subscribe{after = cursor}` resumes losslessly.
-- @treturn integer the cursor
-- @function Subscription:cursor

--- The bytes the delivered set holds (the out-of-order window above the watermark).
-- @treturn integer bytes
-- @function Subscription:delivered_bytes

--- `next(0)` without asking the store's server.
-- @return message|status|queue|part|truncate|nil|false an event; nil: nothing now; false: it
-- needs the server (call `next`, on the engine)
-- @function Subscription:try

--- The store the subscription belongs to.
-- @treturn Store the store
-- @function Subscription:store

--- Closes the subscription (UNLISTEN after the last of its chat). Idempotent.
-- @function Subscription:close

--- Publish
-- @section Publish

--- A stepped publish (`chatstream.Publish`), from `Store:prepare` or `Store:promote_queued`
-- with `prepare = true`: commit, then cache and notify steps in any order. Misuse (a second
-- commit, a step before the commit, a repeated step) raises.
-- @type Publish

--- Runs the transaction.
-- @treturn {integer,...} the message IDs
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes ESTATE (the worker does not hold the chat), ENOTFOUND, EBACKEND, EUNKNOWN
-- @raise "already committed"
-- @function Publish:commit

--- The cache append of message i (every one not yet cached without i).
-- @tparam[opt] integer i the message's index, from 1
-- @treturn boolean true
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @function Publish:cache

--- The notification of message i (every one not yet notified without i).
-- @tparam[opt] integer i the message's index, from 1
-- @treturn boolean true
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EBACKEND
-- @function Publish:notify

--- Cache and notify for everything remaining, in order.
-- @treturn boolean true
-- @return[2] nil
-- @treturn[2] string message
-- @treturn[2] string code
-- @codes EBACKEND
-- @function Publish:publish

--- The store the publish belongs to.
-- @treturn Store the store
-- @function Publish:store

--- Closes the publish (a prepared one that was never committed writes nothing). Idempotent.
-- @function Publish:close

--- MemoryDB
-- @section MemoryDB

--- A shared in-memory database (`chatstream.MemoryDB`, from `memory`), with fault knobs for
-- tests. Reference counted: stores on it keep it alive.
-- @type MemoryDB

--- The next n read queries (messages, status, queue) fail with EBACKEND; 0 clears.
-- @tparam integer n count >= 0
-- @treturn MemoryDB the database
-- @function MemoryDB:fail_queries

--- The next n notifications are dropped; 0 clears.
-- @tparam integer n count >= 0
-- @treturn MemoryDB the database
-- @function MemoryDB:drop_notifies

--- Drops the caller's reference (stores opened on it keep working). Idempotent.
-- @function MemoryDB:close
