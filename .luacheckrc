-- luacheck configuration for chatstream
std = "lua54"
max_line_length = 120
files["spec"] = { std = "+busted" }
-- types/: LuaLS ---@meta stubs (never loaded): empty bodies by design, so
-- their arguments are unused and the class tables only receive methods
-- (241); an annotation's table type is one line, however long.
files["types"] = { unused_args = false, self = false, ignore = { "241" }, max_line_length = false }
