-- spec/support/ldoc_index.lua - an LDoc filter (ldoc --filter
-- support.ldoc_index.print): prints one line per documented item, what
-- spec/docs_spec.lua compares with the loaded module. A line is
-- module TAB name TAB kind TAB params (comma-separated) TAB fields (of a table).
local M = {}

function M.print(modules)
  for _, mod in ipairs(modules) do
    print(table.concat({ mod.name, "", "module", "", "" }, "\t"))
    for _, item in ipairs(mod.items) do
      local fields = {}
      if item.type == "table" or item.type == "type" then
        for _, f in ipairs(item.params or {}) do
          fields[#fields + 1] = f
        end
      end
      local params = {}
      if item.type == "function" then
        for _, p in ipairs(item.params or {}) do
          params[#params + 1] = p
        end
      end
      print(table.concat({ mod.name, item.name, item.type, table.concat(params, ","),
        table.concat(fields, ",") }, "\t"))
    end
  end
end

return M
