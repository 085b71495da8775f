-- POST /api/reservations for one product; the product id comes from the environment.
local product = os.getenv("PRODUCT_ID") or "1"
local quantity = os.getenv("QUANTITY") or "1"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"productId":' .. product .. ',"quantity":' .. quantity .. '}'

local statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

done = function(summary, latency, requests)
  for status, count in pairs(statuses) do
    io.stderr:write(string.format("status %d: %d\n", status, count))
  end
end
