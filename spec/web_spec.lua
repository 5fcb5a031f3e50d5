-- spec/web_spec.lua - examples/web.lua (chatstream.web) as its own process,
-- driven over HTTP by lua-http clients: the endpoint contract and its
-- errors on both stores; on PostgreSQL, an event stream that resumes across
-- a SIGKILL of the server with every message once, 200 concurrent clients
-- in one process, and a client that stops reading let go while the others
-- go on. (spec/web_browser_spec.lua does it in a real browser.)
local H = require("helpers")
local S = require("support.sse")
local cqueues = require("cqueues")
local socket = require("cqueues.socket")
local W = require("support.web_server")

local function post(s, path, body, headers)
  return S.json(S.request("POST", s.url .. path, body, headers))
end

local db_ids = W.db_ids

local with_server = W.with

H.each_backend(_ENV, function(kind)
  it("answers the endpoint contract: chats, messages (the lifecycle's send), the page", function()
    with_server(kind, nil, function(s)
      local status, body = post(s, "/chats")
      assert.are.equal(201, status)
      local chat = body.id
      assert.is_true(math.type(chat) == "integer" and chat >= 1)
      status, body = post(s, "/chats/" .. chat .. "/messages", "hello")
      assert.are.equal(201, status)
      assert.are.same({ id = 1, queued = false }, body)
      -- the chat's turn is pending now: the next message waits in the queue
      status, body = post(s, "/chats/" .. chat .. "/messages", "and then")
      assert.are.equal(201, status)
      assert.is_true(body.queued)
      -- a retry with the same Idempotency-Key is the same message
      local st2, again = post(s, "/chats/" .. chat .. "/messages", "and then", { ["idempotency-key"] = "k1" })
      local st3, third = post(s, "/chats/" .. chat .. "/messages", "and then", { ["idempotency-key"] = "k1" })
      assert.are.same({ 201, 201 }, { st2, st3 })
      assert.are.same(again, third)
      local st, page, h = S.request("GET", s.url .. "/chats/" .. chat)
      assert.are.equal(200, st)
      assert.are.equal("text/html; charset=utf-8", h:get("content-type"))
      H.contains("new EventSource(\"/chats/\" + chat + \"/events\")", page)
      H.contains("const chat = " .. chat .. ";", page)
      st, page = S.request("GET", s.url .. "/")
      assert.are.equal(200, st)
      H.contains("fetch(\"/chats\", {method: \"POST\"})", page)
    end)
  end)

  it("refuses bad input with a clear status and goes on serving", function()
    with_server(kind, { "--max-pending", "100000" }, function(s)
      local _, c = post(s, "/chats", '{"title": "t"}')
      local chat = c.id
      local function check(want, method, path, body, headers, msg)
        local status, text = S.request(method, s.url .. path, body, headers)
        local _, t = S.json(status, text)
        assert.are.equal(want, status, method .. " " .. path .. ": " .. tostring(text))
        H.contains(msg, t.error)
      end
      check(400, "POST", "/chats/abc/messages", "x", nil, "the chat id must be an integer >= 1, not \"abc\"")
      check(400, "POST", "/chats/0/messages", "x", nil, "the chat id must be an integer")
      check(400, "POST", "/chats/99999999999999999999/messages", "x", nil, "the chat id must be an integer")
      check(400, "POST", "/chats/" .. chat .. "/messages", "", nil, "the body (the message's text) is empty")
      check(400, "POST", "/chats/" .. chat .. "/messages", "\xff\xfe", nil,
        "EINVAL: message content is not valid UTF-8")
      check(400, "POST", "/chats", "[1,", nil, "the body must be a JSON object")
      check(404, "POST", "/chats/999/messages", "x", nil, "ENOTFOUND: no chat 999")
      check(404, "GET", "/chats/999/events", nil, nil, "ENOTFOUND: no chat 999")
      check(404, "GET", "/chats/999", nil, nil, "ENOTFOUND: no chat 999")
      check(404, "GET", "/nothing/here", nil, nil, "no such path: /nothing/here")
      check(405, "GET", "/chats", nil, nil, "POST only")
      check(405, "DELETE", "/chats/" .. chat, nil, nil, "GET only")
      check(413, "POST", "/chats/" .. chat .. "/messages", ("x"):rep(64 * 1024 + 1), nil, "limited to 65536 bytes")
      check(400, "GET", "/chats/" .. chat .. "/events", nil, { ["last-event-id"] = "soon" },
        "Last-Event-ID must be an integer >= 0")
      check(400, "GET", "/chats/" .. chat .. "/events?after=-1", nil, nil, "after must be an integer >= 0")
      check(400, "GET", "/chats/" .. chat .. "/events?after=5", nil, nil, "EINVAL: after = 5 is beyond")
      -- clients that go away mid-body (one announcing more than the limit,
      -- one within it) hold nothing up
      for _, len in ipairs({ 1000, 100000 }) do
        local half = assert(socket.connect("127.0.0.1", s.port))
        half:setmode("b", "b")
        assert(half:write(("POST /chats/%d/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n0123456789")
          :format(chat, len)))
        assert(half:flush())
        half:close()
      end
      for _ = 1, 3 do
        local t0 = cqueues.monotime()
        assert.are.equal(200, (S.request("GET", s.url .. "/chats/" .. chat)))
        assert.is_true(cqueues.monotime() - t0 < 2, "answered at once")
      end
      -- and it still serves
      local status, body = post(s, "/chats/" .. chat .. "/messages", ("y"):rep(64 * 1024))
      assert.are.equal(201, status)
      assert.are.same({ id = 1, queued = false }, body) -- the chat's first message: nothing before was written
      -- the turn is pending: 20 more wait in the queue (max_queue), the next is refused
      for i = 1, 20 do
        local st, b = post(s, "/chats/" .. chat .. "/messages", "q" .. i)
        assert.are.same({ 201, true }, { st, b.queued }, i)
      end
      check(429, "POST", "/chats/" .. chat .. "/messages", "q21", nil,
        "EFULL: chat " .. chat .. "'s queue holds 20")
    end)
  end)

  it("streams the snapshot then live events; id: is the cursor; Last-Event-ID and ?after= resume", function()
    with_server(kind, { "--heartbeat", "0.2" }, function(s)
      local _, c = post(s, "/chats")
      local chat = c.id
      post(s, "/chats/" .. chat .. "/messages", "one")
      local cq = cqueues.new()
      local url = s.url .. "/chats/" .. chat .. "/events"
      local all = S.client(cq, url)
      S.run_until(cq, function() return #all.ids == 1 end, 10, "the snapshot's message")
      assert.are.equal("1", all.last_id)
      assert.are.equal("pending", all.chat_status)
      post(s, "/chats/" .. chat .. "/messages", "two") -- queued: a queue event
      S.run_until(cq, function() return (all.kinds.queue or 0) >= 1 end, 10, "the live queue event")
      S.run_until(cq, function() return all.comments >= 2 end, 10, "two heartbeats")
      assert.are.equal(1, all.connects)
      assert.are.same({ { id = 1, chat_id = chat, role = "user", content = "one", prev_id = 0 } }, all.messages)
      -- a resume from the cursor gets nothing again; from 0, the message
      local from1 = S.client(cq, url, { reconnect = false })
      from1.last_id = "1"
      local from0 = S.client(cq, url .. "?after=0", { reconnect = false })
      S.run_until(cq, function() return #from0.ids == 1 and (from1.kinds.queue or 0) >= 1 end, 10, "the resumes")
      assert.are.same({}, from1.ids)
      all:stop()
      from1:stop()
      from0:stop()
      S.run_until(cq, function() return all.done and from1.done and from0.done end, 10, "the clients' end")
    end)
  end)
end)

describe("web server on PostgreSQL", function()
  if not H.require_pg(_ENV) then
    return
  end

  it("resumes an event stream across a SIGKILL of the server: every message once, in order", function()
    H.with_instance("postgresql", function(inst)
      local writer = inst:open()
      local chat = assert(writer:create_chat({ owner = "web" }))
      local s = W.start(inst)
      local port = s.port
      local ok, err = pcall(function()
        local cq = cqueues.new()
        local c = S.client(cq, s.url .. "/chats/" .. chat .. "/events")
        local n = 0
        local function write(k)
          for _ = 1, k do
            n = n + 1
            assert(writer:append(chat, { role = "user", content = "m" .. n }))
          end
        end
        -- written while the client streams
        for _ = 1, 20 do
          write(3)
          S.run_until(cq, function() return #c.ids >= n - 30 end, 10, "the stream to keep up")
        end
        S.run_until(cq, function() return #c.ids >= 40 end, 10, "40 messages")
        W.kill(s, "KILL") -- mid-stream: messages are still being written
        write(25) -- while the server is down
        for _ = 1, 5 do
          cq:step(0.05) -- the client finds its stream gone and retries
        end
        s = W.start(inst, { "--port", tostring(port) })
        write(15)
        S.run_until(cq, function() return #c.ids >= n end, 20, "every message after the restart")
        for _ = 1, 10 do
          cq:step(0.02) -- anything late would show as a duplicate
        end
        c:stop()
        S.run_until(cq, function() return c.done end, 5, "the client's end")
        assert.are.equal(100, n)
        assert.are.same(db_ids(writer, chat), c.ids)
        assert.is_true(c.connects >= 2, "reconnected")
        print(("\n  web resume: %d messages, %d connects, ends %s"):format(#c.ids, c.connects,
          table.concat(c.ends, "; ")))
      end)
      local stderr = W.stop(s)
      assert(ok, tostring(err) .. "\n" .. stderr)
    end)
  end)

  it("streams status events with a recorded error and the archived flag", function()
    W.with("postgresql", nil, function(s, inst)
      local store = inst:open()
      local chat = assert(store:create_chat({ owner = "web" }))
      local cq = cqueues.new()
      local statuses = {}
      local c = S.client(cq, s.url .. "/chats/" .. chat .. "/events", { reconnect = false })
      S.run_until(cq, function() return c.chat_status == "waiting" end, 10, "the snapshot's status")
      assert(store:send(chat, { content = "work" }))
      assert.are.same({ chat }, store:acquire({ worker = "w1" }))
      assert(store:finish(chat, "error", { worker = "w1", error = "the model timed out" }))
      assert(store:archive(chat))
      -- the client keeps each status event's data
      S.run_until(cq, function()
        for _, m in ipairs(c.statuses or {}) do
          statuses[#statuses + 1] = m
        end
        c.statuses = {}
        return #statuses > 0 and statuses[#statuses].archived == true
      end, 10, "the archived status")
      local errors = {}
      for _, m in ipairs(statuses) do
        if m.status == "error" then
          errors[#errors + 1] = m.error
        end
      end
      assert.are.same({ "the model timed out", "the model timed out" }, errors) -- the error, then archived
      c:stop()
      S.run_until(cq, function() return c.done end, 5, "the client's end")
    end)
  end)

  it("streams an edit as a truncate, then the new message; a reconnect from the truncate's id goes on from the cut",
    function()
    W.with("postgresql", nil, function(s, inst)
      local store = inst:open()
      local chat = assert(store:create_chat({ owner = "web" }))
      local u1 = assert(store:send(chat, { content = "first" }))
      assert.are.same({ chat }, store:acquire({ worker = "w1" }))
      local a1 = store:append(chat, { role = "assistant", content = "reply" }, { worker = "w1" })[1]
      local cq = cqueues.new()
      local url = s.url .. "/chats/" .. chat .. "/events"
      local c = S.client(cq, url, { reconnect = false })
      S.run_until(cq, function() return #c.ids == 2 end, 10, "the snapshot's messages")
      local nid = assert(store:edit(chat, u1, { content = "first, edited" }))
      S.run_until(cq, function() return #c.ids == 3 end, 10, "the new message")
      assert.are.same({ u1, a1, nid }, c.ids)
      assert.are.same({ { after = 0, history = 1, id = "0" } }, c.truncates)
      assert.are.equal(tostring(nid), c.last_id)
      assert.are.same({ nid }, db_ids(store, chat))
      -- a browser that got the truncate but not the new message resumes
      -- from the truncate's id: the new message, no truncate again
      local r = S.client(cq, url, { reconnect = false, last_id = c.truncates[1].id })
      -- one that got neither resumes from its old cursor: the truncate first
      local old = S.client(cq, url, { reconnect = false, last_id = tostring(a1) })
      S.run_until(cq, function() return #r.ids == 1 and #old.ids == 1 end, 10, "the resumes")
      assert.are.same({ nid }, r.ids)
      assert.is_nil(r.truncates)
      assert.are.same({ nid }, old.ids)
      assert.are.same({ { after = 0, history = 1, id = "0" } }, old.truncates)
      for _, x in ipairs({ c, r, old }) do
        x:stop()
      end
      S.run_until(cq, function() return c.done and r.done and old.done end, 5, "the clients' end")
    end)
  end)

  it("serves 200 concurrent event streams in one process, each every message once", function()
    W.with("postgresql", nil, function(s, inst)
      local writer = inst:open()
      local chats = {}
      for i = 1, 4 do
        chats[i] = assert(writer:create_chat({ owner = "web" }))
      end
      local cq = cqueues.new()
      local clients = {}
      for i = 1, 200 do
        local chat = chats[(i - 1) % 4 + 1]
        clients[i] = S.client(cq, s.url .. "/chats/" .. chat .. "/events", { reconnect = false })
        clients[i].chat = chat
      end
      S.run_until(cq, function()
        for _, c in ipairs(clients) do
          if (c.kinds.status or 0) < 1 then
            return false
          end
        end
        return true
      end, 30, "200 snapshots")
      for i = 1, 25 do
        for _, chat in ipairs(chats) do
          assert(writer:append(chat, { role = "user", content = "m" .. i }))
        end
        cq:step(0.01)
      end
      S.run_until(cq, function()
        for _, c in ipairs(clients) do
          if #c.ids < 25 then
            return false
          end
        end
        return true
      end, 30, "every client's 25 messages")
      cq:step(0.1)
      local want = {}
      for _, chat in ipairs(chats) do
        want[chat] = db_ids(writer, chat)
      end
      for i, c in ipairs(clients) do
        assert.are.same(want[c.chat], c.ids, "client " .. i)
        assert.are.equal(1, c.connects)
        c:stop()
      end
      S.run_until(cq, function() return clients[200].done end, 5, "the clients' end")
    end)
  end)

  it("does not spin while a client that stops reading has a full outbox", function()
    W.with("postgresql", { "--max-pending", "4096", "--write-timeout", "60" }, function(s, inst)
      local writer = inst:open()
      local chat = assert(writer:create_chat({ owner = "web" }))
      local stalled = assert(socket.connect("127.0.0.1", s.port))
      stalled:setmode("b", "b")
      assert(stalled:write(("GET /chats/%d/events HTTP/1.1\r\nHost: x\r\n\r\n"):format(chat)))
      assert(stalled:flush())
      local big = ("z"):rep(60000)
      for i = 1, 200 do -- more than the sockets hold: its events wait in its subscription
        assert(writer:append(chat, { role = "user", content = i .. big }))
      end
      local function cpu() -- the server's CPU seconds
        local f = assert(io.open("/proc/" .. s.pid .. "/stat"))
        local st = f:read("a")
        f:close()
        local fields = {}
        for x in st:match("%) (.*)$"):gmatch("%S+") do
          fields[#fields + 1] = x
        end
        return (tonumber(fields[12]) + tonumber(fields[13])) / 100
      end
      os.execute("sleep 1") -- the appends' notifications are in
      local c0 = cpu()
      os.execute("sleep 2")
      local used = cpu() - c0
      assert.is_true(used < 0.5, ("the server used %.2f s of CPU in 2 s while idle"):format(used))
      stalled:close()
    end)
  end)

  it("lets a client that stops reading go, while the others get everything at once; it resumes losslessly", function()
    W.with("postgresql", { "--max-pending", "262144", "--write-timeout", "1" }, function(s, inst)
      local writer = inst:open()
      local chat = assert(writer:create_chat({ owner = "web" }))
      -- the stalled client: asks for the stream and reads nothing
      local stalled = assert(socket.connect("127.0.0.1", s.port))
      stalled:setmode("b", "b") -- bytes as they are (no CRLF translation): the chunk sizes count them
      assert(stalled:write(("GET /chats/%d/events HTTP/1.1\r\nHost: x\r\n\r\n"):format(chat)))
      assert(stalled:flush())
      local cq = cqueues.new()
      local live = S.client(cq, s.url .. "/chats/" .. chat .. "/events", { reconnect = false })
      S.run_until(cq, function() return (live.kinds.status or 0) >= 1 end, 10, "the live client's snapshot")
      -- 12 MB, more than the sockets' buffers hold, written from a
      -- coroutine of the clients' loop (its appends yield to the client)
      local w = assert(require("chatstream.cqueues").open({ dsn = H.dsn, schema = inst.schema }))
      local t0 = cqueues.monotime()
      cq:wrap(function()
        local big = ("z"):rep(60000)
        for i = 1, 200 do
          assert(w:append(chat, { role = "user", content = i .. big }))
        end
      end)
      S.run_until(cq, function() return #live.ids == 200 or live.done end, 30, "the live client's 200 messages")
      assert.are.same({ 200, false }, { #live.ids, live.done or false }, table.concat(live.ends, "; "))
      assert.are.equal(1, live.connects)
      local secs = cqueues.monotime() - t0
      w:close()
      live:stop()
      S.run_until(cq, function() return live.done end, 5, "the live client's end")
      -- the stalled one: past its write timeout (1 s) the server lets it
      -- go and closes the connection; what it got is a prefix, in order
      local t1 = cqueues.monotime() + 2
      S.run_until(cq, function() return cqueues.monotime() > t1 end, 5, "2 s")
      stalled:settimeout(10)
      local raw = {}
      while true do
        local data, rerr = stalled:read(-65536) -- what is there, up to 64 KiB
        if not data then
          assert.is_nil(rerr, "the stalled client's read after " .. #table.concat(raw) .. " bytes")
          break
        end
        raw[#raw + 1] = data
      end
      stalled:close()
      local got = {}
      for id in table.concat(raw):gmatch("\nid: (%d+)\n") do
        got[#got + 1] = math.tointeger(tonumber(id))
      end
      assert.is_true(#got < 200, "let go before the end, got " .. #got)
      for i, id in ipairs(got) do
        assert.are.equal(i, id)
      end
      -- from the last id it got, a new stream brings the rest
      local last = got[#got] or 0
      local rest = S.client(cq, s.url .. "/chats/" .. chat .. "/events?after=" .. last, { reconnect = false })
      S.run_until(cq, function() return #rest.ids == 200 - last end, 30, "the rest after a resume")
      rest:stop()
      S.run_until(cq, function() return rest.done end, 5, "the resumed client's end")
      assert.are.same(db_ids(writer, chat), table.move(rest.ids, 1, #rest.ids, #got + 1, got))
      print(("\n  web slow client: live got 200 in %.2f s; the stalled one %d before it was let go"):format(secs,
        last))
    end)
  end)
end)
