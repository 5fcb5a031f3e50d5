-- spec/web_browser_spec.lua - the chat page of examples/web.lua in a real
-- headless Chromium (spec/support/browser.lua, over the DevTools protocol):
-- what is typed is posted and shown live, with what other clients post and
-- a worker's reply; and on PostgreSQL the server is killed with SIGKILL
-- mid-stream and restarted while another process goes on writing, and the
-- page ends with every message of the chat exactly once, in order, as the
-- database has them. Without Chromium these fail in CI and are pending
-- elsewhere, saying how to get it.
local H = require("helpers")
local S = require("support.sse")
local W = require("support.web_server")
local B = require("support.browser")

local has_browser, why_not = B.available()

local function require_browser(env)
  if has_browser then
    return true
  end
  if H.ci then
    env.it("has a headless Chromium", function()
      error(why_not)
    end)
  else
    env.pending(why_not)
  end
  return false
end

-- Runs fn(browser) and closes the browser, even on error.
local function with_browser(fn)
  local b = B.launch({ timeout = 20 })
  local ok, err = pcall(fn, b)
  b:close()
  if not ok then
    error(err, 0)
  end
end

describe("the chat page in a browser", function()
  if not require_browser(_ENV) then
    return
  end

  H.each_backend(_ENV, function(kind)
    it("posts what is typed and shows it live, with what another client posts", function()
      W.with(kind, nil, function(s, inst)
        with_browser(function(b)
          local _, c = S.json(S.request("POST", s.url .. "/chats"))
          local chat = c.id
          local page = b:open(s.url .. "/chats/" .. chat)
          page:wait("window.chatstream && chatstream.opens >= 1 && chatstream.status === 'waiting'", 10)
          -- the user types and sends: the chat's first message
          page:eval([[(() => {
            document.getElementById("text").value = "hello from the page";
            document.getElementById("form").requestSubmit();
            return true;
          })()]])
          page:wait("document.querySelectorAll('#messages li').length === 1", 10)
          local first = page:eval("document.querySelector('#messages li').textContent")
          assert.are.equal("user: hello from the page", first)
          assert.are.equal("pending", page:wait("chatstream.status === 'pending' && chatstream.status", 10))
          -- another client posts while the turn is pending: the page shows it queued
          local status = S.request("POST", s.url .. "/chats/" .. chat .. "/messages", "from elsewhere")
          assert.are.equal(201, status)
          page:wait("chatstream.queue.length === 1", 10)
          local queued = page:eval("document.querySelector('#queue li').textContent")
          assert.are.equal("queued: from elsewhere", queued)
          if kind == "postgresql" then
            -- a worker (this process) takes the turn and replies: shown live
            local worker = inst:open()
            assert.are.same({ chat }, worker:acquire({ worker = "w1" }))
            assert(worker:append(chat, { role = "assistant", content = "a reply" }, { worker = "w1" }))
            page:wait("document.querySelectorAll('#messages li').length === 2", 10)
            local reply = page:eval("document.querySelectorAll('#messages li')[1].textContent")
            assert.are.equal("assistant: a reply", reply)
            assert.are.same(W.db_ids(worker, chat), page:eval("chatstream.ids"))
          end
          assert.are.equal(1, page:eval("chatstream.opens"))
          page:close()
        end)
      end)
    end)
  end)

  describe("on PostgreSQL", function()
    if not H.require_pg(_ENV) then
      return
    end

    it("ends with every message once, in order, across a SIGKILL of the server and a restart", function()
      H.with_instance("postgresql", function(inst)
        local writer = inst:open()
        local chat = assert(writer:create_chat({ owner = "web" }))
        local s = W.start(inst)
        local port = s.port
        local n = 0
        local function write(k)
          for _ = 1, k do
            n = n + 1
            assert(writer:append(chat, { role = "user", content = "message " .. n }))
          end
        end
        local ok, err = pcall(with_browser, function(b)
          write(5) -- before the page opens: its snapshot
          local page = b:open(s.url .. "/chats/" .. chat)
          page:wait("window.chatstream && chatstream.ids.length === 5", 10)
          for _ = 1, 10 do -- live, a few at a time
            write(3)
            page:wait("chatstream.ids.length >= " .. (n - 3), 10)
          end
          W.kill(s, "KILL") -- mid-stream: the last ones may not have reached the page
          write(20) -- while the server is down, by this process
          page:wait("chatstream.errors >= 1", 10) -- the page noticed, and retries
          s = W.start(inst, { "--port", tostring(port) })
          write(10)
          page:wait("chatstream.ids.length >= " .. n, 20)
          local t = os.time() + 1
          while os.time() <= t do -- anything late would show as a duplicate
            os.execute("sleep 0.1")
          end
          local ids = page:eval("chatstream.ids")
          local shown = page:eval("Array.from(document.querySelectorAll('#messages li')).map((li) => +li.dataset.id)")
          local want = W.db_ids(writer, chat)
          assert.are.equal(65, #want)
          assert.are.same(want, ids)
          assert.are.same(want, shown)
          local last = page:eval("document.querySelector('#messages li:last-child').textContent")
          assert.are.equal("user: message 65", last)
          local opens = page:eval("chatstream.opens")
          assert.is_true(opens >= 2, "the page reconnected")
          print(("\n  browser resume: %d messages shown once each, in order; %d connections, %d errors seen"):format(
            #ids, opens, page:eval("chatstream.errors")))
          page:close()
        end)
        local stderr = W.stop(s)
        assert(ok, tostring(err) .. "\nweb.lua's stderr:\n" .. stderr)
      end)
    end)
  end)
end)
