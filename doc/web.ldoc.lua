--- Chats over HTTP, live to a browser through Server-Sent Events
-- (lua/chatstream/web.lua, on lua-http and `chatstream.cqueues`).
--
-- Endpoints: `POST /chats` -> 201 `{"id": N}`; `POST /chats/N/messages` (the
-- body is the text; an Idempotency-Key header is its key) -> 201 `{"id": M,
-- "queued": false}`; `GET /chats/N/events` -> text/event-stream (a message
-- carries `id: <ev.cursor>`; Last-Event-ID or `?after=C` resumes);
-- `GET /chats/N` the chat's page; `GET /` a page that starts a chat. Bad
-- input: 400, 404, 405, 413, 409 (ESTATE), 429 (EFULL), 403 (EAUTH), 503
-- (store failure); every error body is `{"error": "..."}`.
-- (`require("chatstream.lua_http")`, which this module runs first, adds
-- lua-http's 5.3/5.2 paths under Lua 5.4 and returns true.)
-- LDoc source only, never required.
-- @module chatstream.web

--- Listens and returns the server (`srv:loop()` runs it).
-- @tparam table opts `store` (a store `chatstream.cqueues` opened: required),
-- `cq` (a cqueues controller to use), `log` (`function(line)`, default stderr),
-- and `DEFAULTS`' keys; port 0 picks a free port
-- @treturn Server the server
-- @return[2] nil
-- @return[2] the listen error
-- @raise on an unknown option, a missing store
-- @function listen

--- The defaults of `listen`'s options: `host = "127.0.0.1"`, `port = 8080`,
-- `heartbeat = 15` (seconds between comment lines), `retry = 1000` (ms, the
-- stream's `retry:`), `max_body = 65536` (bytes), `max_pending = 1048576`
-- (bytes formatted for a client and not yet written), `write_timeout = 30`
-- (seconds before a slow client is let go), `owner = "web"` (of the chats
-- POST /chats creates).
-- @table DEFAULTS

--- A listening server. Fields: `cq` (its cqueues controller, where other
-- coroutines may run too), `store`, `stats` (`{streams, let_go, errors}`).
-- @type Server

--- The port it listens on.
-- @treturn integer the port
-- @function Server:port

--- Runs the server until it is closed; a coroutine's error is logged and
-- counted, and the others go on.
-- @treturn boolean true once closed
-- @function Server:loop

--- Stops listening and lets every client go (the store stays open).
-- @function Server:close
