rockspec_format = "3.0"
package = "chatstream"
version = "scm-1"
source = {
  url = "git+file://.",
}
description = {
  summary = "A live chat message stream that loses nothing and delivers nothing twice",
  detailed = [[
chatstream stores chats and their messages durably (an embedded memory store or
PostgreSQL through libpq) and streams them to subscribers: a snapshot, then every new
message live, exactly once, even when concurrent writers publish out of ID order.
A C core with a thin Lua 5.4 module.
]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
-- libpq is found by CMake through pkg-config (Debian: libpq-dev); its
-- headers live in a subdirectory there, which external_dependencies cannot
-- describe portably.
build = {
  type = "cmake",
  variables = {
    LUA_INCDIR = "$(LUA_INCDIR)",
    LUA_LIBDIR = "$(LIBDIR)",
    LUA_LUADIR = "$(LUADIR)",
    BUILD_TESTING = "OFF",
    CMAKE_BUILD_TYPE = "Release",
  },
}
