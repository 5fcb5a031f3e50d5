rockspec_format = "3.0"
package = "chatstream"
version = "scm-1"
-- `luarocks make` builds the checkout it runs in and ignores the source.
-- `make dist VERSION=x.y.z` writes chatstream-x.y.z-1.rockspec from this one
-- (version, url and dir with x.y.z for scm), beside the archive of the
-- committed files it names, and packs chatstream-x.y.z-1.src.rock from both.
source = {
  url = "chatstream-scm.tar.gz",
  dir = "chatstream-scm",
}
description = {
  summary = "A live chat message stream that loses nothing and delivers nothing twice",
  detailed = [[
chatstream stores chats and their messages durably (an embedded memory store or
PostgreSQL through libpq) and streams them to subscribers: a snapshot, then every new
message live, exactly once, even when concurrent writers publish out of ID order.
A C core with a thin Lua 5.4 module. The rock installs the `chatstream` command
(`chatstream demo`, `race`, `tail`, `agent`, `web`: the examples).

Building needs a C99 compiler, CMake >= 3.16 (the build type: luarocks stops
with "'cmake' program not found" without it) and libpq with its headers
(Debian: apt-get install gcc cmake libpq-dev liblua5.4-dev).
]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
-- libpq: luarocks checks for its header, under postgresql/ as Debian lays
-- it out (libpq-dev: /usr/include/postgresql/libpq-fe.h), and its library,
-- so a missing libpq is luarocks' own "Could not find ... for PQ" error; it
-- passes PQ_INCDIR and PQ_LIBDIR on to CMake, which looks in PQ_INCDIR and
-- PQ_INCDIR/postgresql. (Elsewhere: PQ_INCDIR=<dir holding postgresql/>.)
external_dependencies = {
  PQ = { header = "postgresql/libpq-fe.h", library = "pq" },
}
build = {
  type = "cmake",
  variables = {
    LUA_INCDIR = "$(LUA_INCDIR)",
    LUA_LIBDIR = "$(LIBDIR)",
    LUA_LUADIR = "$(LUADIR)",
    PQ_INCDIR = "$(PQ_INCDIR)",
    PQ_LIBDIR = "$(PQ_LIBDIR)",
    BUILD_TESTING = "OFF",
    CMAKE_BUILD_TYPE = "Release",
  },
  -- The examples the command runs, as modules (chatstream.examples.demo,
  -- ...): bin/chatstream finds them on package.path.
  -- The LuaLS annotations (types/, for editors) and the LDoc sources go
  -- into the rock's directory in the tree.
  copy_directories = { "types", "doc" },
  install = {
    bin = { chatstream = "bin/chatstream" },
    lua = {
      ["chatstream.examples.demo"] = "examples/demo.lua",
      ["chatstream.examples.race"] = "examples/race.lua",
      ["chatstream.examples.tail"] = "examples/tail.lua",
      ["chatstream.examples.agent"] = "examples/agent.lua",
      ["chatstream.examples.web"] = "examples/web.lua",
    },
  },
}
