# Consul ACL policy of the Nomad agent's own token (the agent's
# consul.token), as Nomad's documentation gives it: Nomad registers its own
# services and, without workload identities, the jobs' services and checks.
# Nomad servers that run Consul service mesh jobs also need
#
#   acl  = "write"
#   mesh = "write"
#
# e2e/acl_test.go runs its Nomad agent (server and client) with this file as
# it is.

agent_prefix "" { policy = "read" }
node_prefix "" { policy = "write" }
service_prefix "" { policy = "write" }
