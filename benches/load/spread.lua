-- wrk script of scenarios.py (`many`, `growth`): every request picks a route prefix /r<i> and a
-- client key bench-key-<j> (sent as X-Api-Key) at random, uniformly, from SPREAD_ROUTES routes
-- and SPREAD_KEYS keys (environment; 0 keys: no key header). The seed is fixed, so every
-- contender gets the same sequence.
local routes = tonumber(os.getenv("SPREAD_ROUTES")) or 200
local keys = tonumber(os.getenv("SPREAD_KEYS")) or 1000
math.randomseed(1)

request = function()
   local path = "/r" .. math.random(0, routes - 1) .. "/api/projects/v1"
   if keys > 0 then
      return wrk.format("GET", path, { ["X-Api-Key"] = "bench-key-" .. math.random(0, keys - 1) })
   end
   return wrk.format("GET", path)
end
