# Nomad ACL policy of the zeroscale plugin's token (nomad.token_file):
#
#   nomad acl policy apply -description "zeroscale plugin" zeroscale nomad-zeroscale.policy.hcl
#   nomad acl token create -name zeroscale -policy zeroscale -type client
#
# One namespace block per namespace that holds gated jobs. e2e/acl_test.go
# runs the plugin with this file as it is.

namespace "default" {
  # list-jobs and read-job: the scaling policies (Nomad takes these two in
  # place of list-scaling-policies and read-scaling-policy), the jobs, their
  # scale status, allocations and deployments.
  # scale-job: the scale to 0, the wake's scale-up, and the scaling events
  # zeroscale records.
  capabilities = ["list-jobs", "read-job", "scale-job"]
}
