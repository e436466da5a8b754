"""volkv through a widely used third-party client, py-consul.

Run by scripts/test-py-consul: `check.py HOST PORT ACL_PORT`, PORT a server
without ACLs, ACL_PORT one with the tokens py-admin-token (write all) and
py-reader-token (read py/). Exits non-zero (an AssertionError or exception)
at the first answer a Consul client would misread.
"""

import base64
import sys

import consul
from consul.exceptions import ACLPermissionDenied, ClientError, ConsulException

host, port, acl_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
admin = consul.Consul(host=host, port=port)

# What clients call at start-up.
assert admin.agent.self()["Config"]["Datacenter"] == "dc1"
assert admin.status.leader() == f"{host}:{port}"
assert admin.status.peers() == [f"{host}:{port}"]

# KV: put, get, index, cas, recurse, keys, delete.
assert admin.kv.put("py/a", "1") is True
index, entry = admin.kv.get("py/a")
assert entry["Value"] == b"1" and int(index) == entry["ModifyIndex"], (index, entry)
same_index, _ = admin.kv.get("py/a", index=index, wait="50ms")
assert same_index == index, (same_index, index)
assert admin.kv.put("py/a", "2", cas=0) is False
assert admin.kv.put("py/a", "2", cas=entry["ModifyIndex"]) is True
assert admin.kv.put("py/b", "x") is True
_, items = admin.kv.get("py/", recurse=True)
assert [item["Key"] for item in items] == ["py/a", "py/b"], items
_, keys = admin.kv.get("py/", keys=True)
assert keys == ["py/a", "py/b"], keys
assert admin.kv.delete("py/b") is True
_, gone = admin.kv.get("py/b")
assert gone is None
after_delete, _ = admin.kv.get("py/", recurse=True)
assert int(after_delete) > int(index)

# Txn.
encoded = base64.b64encode(b"t").decode()
result = admin.txn.put([{"KV": {"Verb": "set", "Key": "py/t", "Value": encoded}}])
assert result["Results"][0]["KV"]["Key"] == "py/t", result

# No sessions: a lock must fail loudly, never "succeed" for two holders.
try:
    admin.session.create()
    raise AssertionError("session.create succeeded on a server without sessions")
except ConsulException as refused:
    assert "501" in str(refused) and "Sessions are not supported" in str(refused), refused

# Another datacenter has no path.
try:
    admin.kv.get("py/a", dc="elsewhere")
    raise AssertionError("a read from another datacenter was answered")
except ConsulException as refused:
    assert "No path to datacenter" in str(refused), refused

# An oversized value: a 413 the client can read, not a broken pipe.
try:
    admin.kv.put("py/big", "x" * (2 * 1024 * 1024))
    raise AssertionError("an oversized value was accepted")
except ClientError as refused:
    assert "413" in str(refused), refused

# ACL: a read-only token reads and cannot write. (py-consul sends no token
# with txn.put, so a txn there is anonymous and refused.)
guarded = consul.Consul(host=host, port=acl_port, token="py-admin-token")
assert guarded.agent.self()["Config"]["Datacenter"] == "dc1"
assert guarded.kv.put("py/a", "2") is True
reader = consul.Consul(host=host, port=acl_port, token="py-reader-token")
_, entry = reader.kv.get("py/a")
assert entry["Value"] == b"2"
for write in (
    lambda: reader.kv.put("py/a", "3"),
    lambda: reader.kv.delete("py/a"),
    lambda: guarded.txn.put([{"KV": {"Verb": "delete", "Key": "py/a"}}]),
):
    try:
        write()
        raise AssertionError("a write without write permission succeeded")
    except ACLPermissionDenied:
        pass
_, entry = guarded.kv.get("py/a")
assert entry["Value"] == b"2"

print("py-consul: every check passed")
