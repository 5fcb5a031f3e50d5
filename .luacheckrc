-- luacheck configuration for chatstream
std = "lua54"
max_line_length = 120
files["spec"] = { std = "+busted" }
