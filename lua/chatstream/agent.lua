-- chatstream.agent: a worker loop for Lua agents.
--
-- An agent is a function from a chat's history (a list of message events,
-- ascending) to the messages to append: assistant text, assistant tool calls
-- with their results (tools the worker runs itself), or assistant tool calls
-- without results (client tools: the chat then waits for the client, in
-- requires_action). The worker acquires pending chats, runs the agent, streams
-- the reply's text as parts, appends the messages, and finishes the turn.
--
--   local agent = require("chatstream.agent")
--   agent.run(store, { worker = "w1", agent = agent.scripted, idle = 5 })
local core = require("chatstream.core")

local M = {}

--- A deterministic agent for demos and specs (no model behind it).
-- A user message starting with "/tool" asks the client to run a tool
-- ("client_tool"), whose call ID is "call-<message id>"; a user message
-- starting with "/calc" runs a server tool (call and result in one turn);
-- any other user message is answered "reply to: <text>"; a tool result is
-- answered "the tool said: <result>".
function M.scripted(history)
  local last = history[#history]
  if not last then
    return {}
  end
  if last.role == "user" then
    if last.content:sub(1, 5) == "/tool" then
      return {
        { role = "assistant", content = "asking the client to run client_tool",
          tool_calls = { "call-" .. last.id } },
      }
    elseif last.content:sub(1, 5) == "/calc" then
      local id = "calc-" .. last.id
      return {
        { role = "assistant", content = "calculating", tool_calls = { id } },
        { role = "tool", tool_call_id = id, content = "42" },
        { role = "assistant", content = "the answer is 42" },
      }
    end
    return { { role = "assistant", content = "reply to: " .. last.content } }
  elseif last.role == "tool" then
    return { { role = "assistant", content = "the tool said: " .. last.content } }
  end
  return {}
end

--- The tool calls of msgs that msgs do not answer (client tools).
function M.unresolved(msgs)
  local open, order = {}, {}
  for _, m in ipairs(msgs) do
    if m.role == "assistant" and m.tool_calls then
      for _, id in ipairs(m.tool_calls) do
        open[id] = true
        order[#order + 1] = id
      end
    elseif m.role == "tool" and m.tool_call_id then
      open[m.tool_call_id] = nil
    end
  end
  local left = {}
  for _, id in ipairs(order) do
    if open[id] then
      left[#left + 1] = id
    end
  end
  return left
end

--- The chat's messages (the snapshot of a subscription), ascending.
function M.history(store, chat_id)
  local sub <close> = assert(store:subscribe(chat_id))
  local msgs = {}
  for ev in sub:events(0) do
    if ev.kind == "message" then
      msgs[#msgs + 1] = ev
    end
  end
  return msgs
end

local function split_words(text)
  local parts = {}
  for w in text:gmatch("%S+%s*") do
    parts[#parts + 1] = w
  end
  return parts
end

--- One turn of the agent on a chat the worker holds. Returns the status the
-- chat ended the turn with, and the IDs appended.
-- opts: worker (required), agent (default M.scripted), stream (publish the
-- last assistant text as parts first, word by word; default true).
-- A worker that lost the chat meanwhile writes nothing: interrupted (a
-- queued message was promoted on the running chat), its reply is dropped and
-- its finish promotes the queue's head; taken over by another worker (this
-- one was silent too long) or finished elsewhere, it leaves the chat alone.
function M.turn(store, chat_id, opts)
  local worker = assert(opts.worker, "worker expected")
  local agent = opts.agent or M.scripted
  local msgs = agent(M.history(store, chat_id))
  local held = store:heartbeat(chat_id, worker)
  local ids = {}
  if held and #msgs > 0 then
    local last = msgs[#msgs]
    if opts.stream ~= false and last.role == "assistant" then
      for _, w in ipairs(split_words(last.content)) do
        -- only while the chat runs on this worker (ESTATE: it was let go)
        if not store:publish_part(chat_id, w, { worker = worker }) then
          break
        end
      end
    end
    -- committed only while the chat still runs on this worker
    local got, err, code = store:append(chat_id, msgs, { worker = worker })
    if got then
      ids = got
    elseif code == "ESTATE" then
      held = false
    else
      error(err, 0)
    end
  end
  local status = "waiting"
  if held and #M.unresolved(msgs) > 0 then
    status = "requires_action"
  end
  local ok, final = store:finish(chat_id, status, { worker = worker })
  if not ok then
    -- not ours any more: taken over, or finished elsewhere
    final = assert(store:chat(chat_id)).status
  end
  return final, ids
end

--- The worker loop: acquires pending chats and runs turns until idle for
-- opts.idle seconds (nil: forever) or opts.turns turns are done.
-- opts: worker, agent, stream, limit (chats per acquire, default 1), poll
-- (seconds between acquires when there is nothing, default 0.02),
-- stale_after (take over chats of workers silent this long), on_turn
-- (function(chat_id, final_status, ids) called after each turn), recover
-- (seconds between the store's recovery passes, store:recover(): chats left
-- in requires_action past action_timeout, silent workers, stranded queues;
-- default 5; false: none). Returns the number of turns run.
function M.run(store, opts)
  local worker = assert(opts.worker, "worker expected")
  local poll = opts.poll or 0.02
  local every = opts.recover == nil and 5 or opts.recover
  local idle, turns, recovered = 0, 0, nil
  while not opts.turns or turns < opts.turns do
    if every and (not recovered or core.now() - recovered >= every) then
      local ok, err = store:recover() -- housekeeping: a failure is tried again later
      if not ok then
        io.stderr:write("chatstream.agent: recover: ", tostring(err), "\n")
      end
      recovered = core.now()
    end
    local ids = assert(store:acquire({ worker = worker, limit = opts.limit or 1,
      stale_after = opts.stale_after }))
    if #ids == 0 then
      if opts.idle and idle >= opts.idle then
        break
      end
      -- Sleeps on the store's fd (PostgreSQL; this hub listens to nothing,
      -- so the whole poll); the memory store cannot wait for another
      -- process and returns at once.
      store:step(poll)
      idle = idle + poll
    else
      idle = 0
      for _, chat_id in ipairs(ids) do
        local final, appended = M.turn(store, chat_id, opts)
        turns = turns + 1
        if opts.on_turn then
          opts.on_turn(chat_id, final, appended)
        end
      end
    end
  end
  return turns
end

return M
