-- spec/support/with_env.lua - runs a Lua script with CHATSTREAM_DSN and
-- CHATSTREAM_SCHEMA set (spec/examples_spec.lua spawns the examples
-- through it): lua5.4 with_env.lua <dsn> <schema> <script> [args...]
local dsn, schema, script = arg[1], arg[2], arg[3]
assert(dsn and schema and script, "usage: with_env.lua <dsn> <schema> <script> [args...]")
local args = { table.unpack(arg, 4) }
local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
local quoted = {}
for i, a in ipairs(args) do
  quoted[i] = q(a)
end
-- exec: the example replaces the shell, so its pid is the one to signal
local cmd = ("CHATSTREAM_DSN=%s CHATSTREAM_SCHEMA=%s exec %s %s %s"):format(q(dsn), q(schema),
  os.getenv("CHATSTREAM_LUA") or "lua5.4", q(script), table.concat(quoted, " "))
local ok, _, code = os.execute(cmd)
io.stdout:flush()
os.exit(ok and 0 or (code or 1))
