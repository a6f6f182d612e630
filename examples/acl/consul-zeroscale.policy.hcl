# Consul ACL policy of the zeroscale plugin's token (consul.token_file):
#
#   consul acl policy create -name zeroscale -rules @consul-zeroscale.policy.hcl
#   consul acl token create -description zeroscale -policy-name zeroscale
#
# The key prefix is the plugin's consul.kv_prefix. e2e/acl_test.go runs the
# plugin with this file as it is.

key_prefix "zeroscale/" { policy = "write" } # group state, activity reports, leader lock
session_prefix "" { policy = "write" }       # leader election
service_prefix "" { policy = "write" }       # placeholders (or one rule per gated service)
node_prefix "" { policy = "read" }           # catalog and health of instances
agent_prefix "" { policy = "read" }          # the local agent's node name
