# Nomad client configuration for zeroscale. Put the plugin binary in
# plugin_dir; the block's name is the binary's name.

plugin_dir = "/opt/nomad/plugins"

plugin "nomad-driver-zeroscale" {
  config {
    # Where to run the XDP gate. Default: every interface that is up, lo
    # included (local clients reach the node's own addresses through lo).
    interfaces = ["eth0", "lo"]

    # Where the gate runs, per interface: "auto" (native XDP on NICs, tc
    # ingress on virtual devices), "native", "generic" (XDP) or "tc".
    # gate_mode {
    #   eth0 = "native"
    # }

    # Prometheus metrics; "" turns them off.
    metrics_address = "127.0.0.1:9464"

    # Who may wake a sleeping service (default: anyone).
    # wake_from = ["10.0.0.0/8"]

    # Peers whose connections are never activity (remote health checkers).
    # ignore_sources = ["10.0.5.0/24"]

    # Local processes whose connections are health checks, not activity.
    # Nomad script checks run their program in the task: list it here
    # (pg_isready is, for the PostgreSQL example).
    health_check_processes = ["consul", "nomad", "pg_isready"]

    # Replay the first SYN when the service listens, so the client's own
    # connect() completes without waiting for its retransmit.
    syn_replay  = true
    syn_max_age = "60s"

    # Log and record decisions, gate and scale nothing.
    dry_run = false

    nomad {
      address = "http://127.0.0.1:4646" # default: NOMAD_ADDR
      token   = ""                      # default: NOMAD_TOKEN
    }

    consul {
      address   = "127.0.0.1:8500" # default: CONSUL_HTTP_ADDR
      token     = ""               # default: CONSUL_HTTP_TOKEN
      kv_prefix = "zeroscale"
    }
  }
}
