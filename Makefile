# Makefile - the front door: `make demo` runs the demo, `make test` runs every test.
# The build itself is CMake's (CMakeLists.txt); this file only strings steps together.
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 20
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
LUA        ?= lua5.4
RUN_LUA     = LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(BUILD)/?.so;;" $(LUA)
VALGRIND    = valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect

.PHONY: all deps build demo race web web-bench agent tail stress bench bench-core test test-quick test-unit test-asan \
        test-valgrind test-rock test-lint test-tsan test-fuzz test-docs check-rock lint format dist clean docs

MAKEFLAGS += --no-print-directory

all: build

deps:
	@scripts/bootstrap

build: deps
	@cmake -S . -B $(BUILD) -DCHATSTREAM_WERROR=ON >/dev/null
	@cmake --build $(BUILD) -j$(JOBS)

demo: build
	@$(RUN_LUA) examples/demo.lua

race: build
	@$(RUN_LUA) examples/race.lua

# Chats in a browser (examples/web.lua): http://127.0.0.1:8080/ by default;
# CHATSTREAM_WEB_PORT, CHATSTREAM_DSN as the example says.
web: build
	@$(RUN_LUA) examples/web.lua $(ARGS)

# SSE clients of examples/web.lua beside the same delivery without HTTP (needs CHATSTREAM_DSN)
web-bench: build
	@$(RUN_LUA) examples/web_bench.lua $(ARGS)

# The merge micro-benchmark (core/bench/bench_merge.c), optimised build.
BENCH_BUILD ?= build-bench
bench-core: deps
	@cmake -S . -B $(BENCH_BUILD) -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
	@cmake --build $(BENCH_BUILD) -j$(JOBS) --target bench_merge
	@$(BENCH_BUILD)/bench_merge $(ARGS)

# ARGS are passed on: make agent ARGS="work --idle 60", make tail ARGS=1
agent: build
	@$(RUN_LUA) examples/agent.lua $(ARGS)

tail: build
	@$(RUN_LUA) examples/tail.lua $(ARGS)

# The seed's stress experiment (needs CHATSTREAM_DSN): make stress ARGS="--procs 4 --rounds 2500"
stress: build
	@$(RUN_LUA) examples/stress.lua $(ARGS)

# End to end on PostgreSQL, with pgbench's ceiling (needs CHATSTREAM_DSN)
bench: build
	@$(RUN_LUA) examples/bench.lua $(ARGS)

# Every test: C unit tests and busted specs (normal build), the same under
# ASan+UBSan, valgrind, a short fuzz run, the luarocks install check,
# luacheck and the reference (make docs, test-docs). Every suite runs; the
# summary says which failed.
test: deps
	@scripts/run-tests

test-unit: build
	@cd $(BUILD) && ctest --output-on-failure

# Quick: the C unit tests and the busted specs on the memory store only (the
# PostgreSQL specs are listed as pending); no sanitizers, valgrind, fuzzing,
# rock or lint. Under a minute.
test-quick: build
	@cd $(BUILD) && ctest --output-on-failure -E '^busted$$'
	@env -u CHATSTREAM_TEST_DSN -u CI $(LUA) /usr/bin/busted --cpath="$(BUILD)/?.so" -o utfTerminal

test-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCHATSTREAM_WERROR=ON -DCHATSTREAM_SANITIZE=ON \
	    -DCMAKE_BUILD_TYPE=Debug >/dev/null
	@cmake --build $(ASAN_BUILD) -j$(JOBS)
	@cd $(ASAN_BUILD) && ctest --output-on-failure

# The listener thread under ThreadSanitizer (not in `make test`: run once
# when the thread changes). Needs CHATSTREAM_TEST_DSN (a server; see
# scripts/pg-test-server); kills the reader's listener backend half way.
TSAN_BUILD ?= build-tsan
test-tsan: deps
	@test -n "$$CHATSTREAM_TEST_DSN" || { echo "test-tsan: set CHATSTREAM_TEST_DSN" >&2; exit 1; }
	@cmake -S . -B $(TSAN_BUILD) -DCHATSTREAM_WERROR=ON -DCMAKE_BUILD_TYPE=Debug \
	    -DCMAKE_C_FLAGS="-fsanitize=thread -g -O1" -DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=thread \
	    -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread >/dev/null
	@cmake --build $(TSAN_BUILD) -j$(JOBS) --target chatstream_lua
	@pidf=$$(mktemp); rm -f $$pidf; \
	  ( for i in $$(seq 1 100); do [ -s $$pidf ] && break; sleep 0.1; done; sleep 1.5; \
	    psql -X -q "$$CHATSTREAM_TEST_DSN" -c "SELECT pg_terminate_backend($$(head -1 $$pidf))" >/dev/null ) & \
	  TSAN_PIDFILE=$$pidf LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(TSAN_BUILD)/?.so;;" \
	    LD_PRELOAD=$$($(CC) -print-file-name=libtsan.so) TSAN_OPTIONS="halt_on_error=1 exitcode=66" \
	    $(LUA) core/tests/tsan_listener.lua; rc=$$?; wait; \
	  psql -X -q "$$CHATSTREAM_TEST_DSN" -c "DROP SCHEMA IF EXISTS $$(sed -n 2p $$pidf) CASCADE" >/dev/null 2>&1; \
	  rm -f $$pidf; [ $$rc -eq 0 ] || exit $$rc; \
	  LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(TSAN_BUILD)/?.so;;" \
	    LD_PRELOAD=$$($(CC) -print-file-name=libtsan.so) TSAN_OPTIONS="halt_on_error=1 exitcode=66" \
	    $(LUA) core/tests/tsan_engine.lua; rc=$$?; \
	  psql -X -q "$$CHATSTREAM_TEST_DSN" -c "DO \$$\$$ DECLARE s text; BEGIN FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tsan_engine_%' LOOP EXECUTE 'DROP SCHEMA ' || s || ' CASCADE'; END LOOP; END \$$\$$" >/dev/null 2>&1; \
	  exit $$rc

test-valgrind: build
	@# test_pg_oom replaces malloc, which valgrind's allocator replaces in turn
	@for t in $(BUILD)/test_*; do \
	    case $$t in *test_pg_oom) continue;; esac; \
	    echo "valgrind $$t"; $(VALGRIND) $$t >/dev/null || exit 1; done
	@echo "valgrind: busted specs (api, conventions, race, lifecycle, 200 property seeds)"
	@CHATSTREAM_PROPERTY_SEEDS=200 $(VALGRIND) $(LUA) /usr/bin/busted \
	    --cpath="$(BUILD)/?.so" -o TAP \
	    spec/api_spec.lua spec/conventions_spec.lua spec/race_spec.lua \
	    spec/lifecycle_spec.lua spec/property_spec.lua > $(BUILD)/valgrind-busted.log 2>&1; \
	  rc=$$?; grep -E '^(not ok|1\.\.)|==[0-9]+==' $(BUILD)/valgrind-busted.log | head -40; \
	  if [ $$rc -ne 0 ]; then echo "valgrind busted run failed (exit $$rc)"; exit 1; fi

# libFuzzer (clang): the payload parser and random merge interleavings, each
# for FUZZ_SECONDS from the committed seed corpus (new inputs go to a temp dir).
test-fuzz: deps
	@CC=clang cmake -S . -B $(FUZZ_BUILD) -DCHATSTREAM_FUZZ=ON -DCHATSTREAM_WERROR=ON >/dev/null
	@cmake --build $(FUZZ_BUILD) -j$(JOBS)
	@for f in payload merge; do \
	    dir=$$(mktemp -d /tmp/chatstream-fuzz.XXXXXX); \
	    seeds=core/fuzz/corpus/$$f; [ -d $$seeds ] || seeds=; \
	    echo "fuzz_$$f: $(FUZZ_SECONDS) s"; \
	    $(FUZZ_BUILD)/fuzz_$$f -max_total_time=$(FUZZ_SECONDS) -max_len=9000 \
	        -artifact_prefix=$(FUZZ_BUILD)/ $$dir $$seeds > $(FUZZ_BUILD)/fuzz_$$f.log 2>&1; \
	    rc=$$?; rm -rf $$dir; tail -n 1 $(FUZZ_BUILD)/fuzz_$$f.log; \
	    if [ $$rc -ne 0 ]; then grep -A20 -E 'ERROR|deadly' $(FUZZ_BUILD)/fuzz_$$f.log | head -30; exit 1; fi; \
	done

# The HTML reference (LDoc: doc/config.ld over doc/*.ldoc.lua) into
# $(BUILD)/docs; a warning fails it. LDoc runs under lua5.4 (Debian's ldoc
# script asks for 5.1/5.2, which may be missing).
LDOC ?= $(LUA) /usr/bin/ldoc
docs: deps
	@$(LDOC) -q -c doc/config.ld -d $(BUILD)/docs --fatalwarnings doc
	@echo "docs: $(BUILD)/docs/index.html"

# The reference generated, then the specs that keep it and the README true:
# spec/docs_spec.lua (every public name documented and annotated) and
# spec/readme_spec.lua (the README's commands and Lua blocks). The unit
# suite's busted run has them too; this suite is the one that builds the HTML.
test-docs: build docs
	@$(LUA) /usr/bin/busted --cpath="$(BUILD)/?.so" -o utfTerminal spec/docs_spec.lua spec/readme_spec.lua

test-rock check-rock: deps
	@scripts/check-rock

test-lint lint: deps
	@luacheck -q lua spec examples core/tests doc types bin/chatstream

# The release rock from committed files: dist/chatstream-$(VERSION)-1.rockspec
# and dist/chatstream-$(VERSION)-1.src.rock (scripts/dist).
DIST ?= dist
dist:
	@scripts/dist "$(VERSION)" "$(DIST)"

format:
	@clang-format -i core/include/*.h core/src/*.c core/src/*.h core/src/store/*.h core/src/store/*.c \
	    core/tests/*.c core/tests/*.h core/fuzz/*.c lua/core/*.c lua/core/*.h

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) build.luarocks $(DIST)
