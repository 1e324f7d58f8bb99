-- Argo CD health check for chatoperator.dev/ChatService.
--
-- Argo CD runs this with the live object in the global `obj` and expects a table
-- { status = "Healthy" | "Progressing" | "Degraded", message = "..." }. Written for Lua 5.1
-- (Argo CD embeds gopher-lua): no integer division, goto or other 5.2+ syntax.
--
-- Order of the checks:
--   1. no status, or status.observedGeneration behind metadata.generation -> Progressing
--      (the conditions still describe an older spec);
--   2. Degraded=True or ConfigValid=False                                  -> Degraded
--   3. Progressing=True                                                    -> Progressing
--   4. Ready=True                                                          -> Healthy
--   5. anything else (Ready=False or missing: storage, back ends or pods
--      still coming up)                                                    -> Progressing

local hs = {}

local function condition_map(status)
  local found = {}
  if status ~= nil and status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.type ~= nil then
        found[c.type] = c
      end
    end
  end
  return found
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration
if observed == nil or (generation ~= nil and observed < generation) then
  hs.status = "Progressing"
  if generation ~= nil then
    hs.message = "Waiting for the operator to observe generation " .. string.format("%d", generation)
  else
    hs.message = "Waiting for the operator to observe the latest spec"
  end
  return hs
end

local conditions = condition_map(status)

local config = conditions["ConfigValid"]
if config ~= nil and config.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(config, "The ChatService spec is invalid")
  return hs
end

local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded, "The ChatService is degraded")
  return hs
end

local progressing = conditions["Progressing"]
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing, "A rollout is in progress")
  return hs
end

local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the Ready condition")
return hs
