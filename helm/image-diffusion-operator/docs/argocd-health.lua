-- Argo CD health check for imagediffusion.dev/ImageDiffusionService.
-- Install under argocd-cm key: resource.customizations.health.imagediffusion.dev_ImageDiffusionService
-- It reads the kstatus conditions the operator writes (Ready, Reconciling, Stalled) and
-- status.observedGeneration: a status written for an older spec is never reported Healthy.
local hs = {}

local function condition(conditions, kind)
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.reason or fallback
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local generation = 0
if obj.metadata ~= nil and obj.metadata.generation ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status
if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the service"
  return hs
end
if status.observedGeneration == nil or status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local stalled = condition(status.conditions, "Stalled")
local ready = condition(status.conditions, "Ready")
local reconciling = condition(status.conditions, "Reconciling")

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end
-- A Ready condition computed for an older generation says nothing about the current spec.
if ready ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition of generation " .. generation
  return hs
end
if ready ~= nil and ready.status == "True" and (reconciling == nil or reconciling.status ~= "True") then
  hs.status = "Healthy"
  local replicas = ""
  if status.readyReplicas ~= nil and status.replicas ~= nil then
    replicas = status.readyReplicas .. "/" .. status.replicas .. " replicas ready"
  end
  if status.endpoint ~= nil then
    if replicas ~= "" then
      replicas = replicas .. ", "
    end
    replicas = replicas .. "serving " .. status.endpoint
  end
  if replicas == "" then
    replicas = describe(ready, "Ready")
  end
  hs.message = replicas
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling, "Reconciling")
  return hs
end
if ready ~= nil and ready.status == "False" then
  -- Not ready and the operator is no longer working on it: the workers failed after a rollout.
  hs.status = "Degraded"
  hs.message = describe(ready, "NotReady")
  return hs
end
hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the Ready condition")
return hs
