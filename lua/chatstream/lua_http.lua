-- chatstream.lua_http: makes lua-http loadable under Lua 5.4.
--
--   require("chatstream.lua_http")   -- then require("http.server") etc.
--
-- Debian packages lua-http (pure Lua) under the Lua 5.1-5.3 paths only;
-- under 5.4 it runs as it is (its C parts, cqueues, luaossl and lpeg, have
-- 5.4 builds). When it cannot be found on package.path, this adds the 5.3
-- and 5.2 directories after the others. Returns true.
if not pcall(require, "http.version") and not package.path:find("/usr/share/lua/5.3/", 1, true) then
  for _, v in ipairs({ "5.3", "5.2" }) do
    local dir = "/usr/share/lua/" .. v
    package.path = ("%s;%s/?.lua;%s/?/init.lua"):format(package.path, dir, dir)
  end
end
return true
