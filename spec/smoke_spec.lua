local H = require "helper"
describe("errors", function()
  it("are objects with kind and message", function()
    local e = H.raises("Value", H.luamp.sleep, -1)
    assert.equal(H.luamp.errors.Value, e.kind)
    assert.truthy(tostring(e):match("^luamp%.Value: "))
  end)
end)
