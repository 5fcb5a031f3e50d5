-- spec/support/web_server.lua - examples/web.lua as its own process, for
-- the web specs: W.start(inst, args) on the instance's store (PostgreSQL
-- when inst has a schema, else the embedded one), on a free port unless
-- args has --port; W.kill(s, sig) signals it and waits until it has gone
-- (its stderr); W.stop(s) ends it and removes its files; W.with(kind,
-- args, fn) runs fn(s, inst) with one on a fresh instance and stops it; W.db_ids(store,
-- chat) the chat's message ids as the database has them, in order.
local H = require("helpers")
local P = require("support.procs")

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "../../"

local W = {}

--- Starts examples/web.lua as its own process (on PostgreSQL when inst has a
-- schema), on a free port unless args has --port; returns the server {pid,
-- port, url, out, err} once it serves.
function W.start(inst, args)
  local s = { out = os.tmpname(), err = os.tmpname() }
  args = args or {}
  local has_port = false
  for _, a in ipairs(args) do
    has_port = has_port or a == "--port"
  end
  if not has_port then
    args = { "--port", "0", table.unpack(args) }
  end
  local env = "CHATSTREAM_DSN="
  if inst.schema then
    env = ("CHATSTREAM_DSN=%s CHATSTREAM_SCHEMA=%s"):format(P.shq(H.dsn), P.shq(inst.schema))
  end
  local quoted = {}
  for i, a in ipairs(args or {}) do
    quoted[i] = P.shq(a)
  end
  local cmd = ("env %s LUA_PATH=%s LUA_CPATH=%s %s %s %s >%s 2>%s </dev/null & echo $!"):format(env,
    P.shq(package.path), P.shq(package.cpath), P.LUA, P.shq(ROOT .. "examples/web.lua"), table.concat(quoted, " "),
    P.shq(s.out), P.shq(s.err))
  local f = assert(io.popen(cmd, "r"))
  s.pid = assert(math.tointeger(tonumber(f:read("l"))), "no pid")
  f:close()
  local deadline = os.time() + 20
  while not s.port do
    s.port = math.tointeger(tonumber(P.slurp(s.out):match("serving http://127%.0%.0%.1:(%d+)/") or ""))
    if not s.port then
      if os.time() > deadline or not os.execute("kill -0 " .. s.pid .. " 2>/dev/null") then
        error("web.lua did not start: " .. P.slurp(s.err))
      end
      os.execute("sleep 0.05")
    end
  end
  s.url = ("http://127.0.0.1:%d"):format(s.port)
  return s
end

function W.kill(s, sig)
  os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", s.pid))
  for _ = 1, 100 do
    if not os.execute("kill -0 " .. s.pid .. " 2>/dev/null") then
      return P.slurp(s.err)
    end
    os.execute("sleep 0.05")
  end
  error("web.lua " .. s.pid .. " did not end")
end

function W.stop(s)
  local err = W.kill(s, "TERM")
  os.remove(s.out)
  os.remove(s.err)
  return err
end

--- Runs fn(s, inst) with a server on a fresh instance of kind (args as
-- W.start's), then stops it, even on error; a failure carries its stderr.
function W.with(kind, args, fn)
  H.with_instance(kind, function(inst)
    local s = W.start(inst, args)
    local ok, err = pcall(fn, s, inst)
    local stderr = W.stop(s)
    if not ok then
      error(tostring(err) .. "\nweb.lua's stderr:\n" .. stderr, 0)
    end
  end)
end

function W.db_ids(store, chat)
  local sub = assert(store:subscribe(chat))
  local ids = H.drain(sub, {}, 0)
  sub:close()
  return ids
end

return W
