# A Python HTTP server in Nomad's bridge mode: the group has a network
# namespace of its own, and the node's address and static port are mapped to
# port 8080 inside it by the CNI portmap plugin. The client needs cni_path set
# to the CNI plugins (Debian's containernetworking-plugins: /usr/lib/cni).
#
#   nomad job run -var node=$(nomad node status -self -t '{{.Name}}') examples/jobs/bridge.nomad.hcl

variable "node" {
  type        = string
  description = "Name of the Nomad node to run on: a sleeping service must wake at the same address."
}

variable "port" {
  type    = number
  default = 8084
}

variable "idle_timeout" {
  type    = string
  default = "10m"
}

variable "ready" {
  type    = string
  default = "listen"
}

job "bridge" {
  datacenters = ["*"]

  constraint {
    attribute = "${node.unique.name}"
    value     = var.node
  }

  group "bridge" {
    count = 1

    network {
      mode = "bridge"

      port "http" {
        static = var.port
        to     = 8080
      }
    }

    service {
      name = "bridge"
      port = "http"

      check {
        type     = "http"
        path     = "/"
        interval = "1s"
        timeout  = "1s"
      }
    }

    update {
      min_healthy_time = "1s"
    }

    scaling {
      enabled = true
      min     = 0
      max     = 1

      policy {
        zeroscale {
          idle_timeout = var.idle_timeout
          wake_count   = 1
          wake_timeout = "2m"
          ready        = var.ready
        }
      }
    }

    task "server" {
      driver = "zeroscale"

      config {
        command = "/usr/bin/python3"
        # Listens on every address of the group's namespace.
        args = ["-m", "http.server", "8080", "--directory", "${NOMAD_TASK_DIR}"]
      }

      template {
        destination = "local/index.html"
        data        = "hello from a bridge-mode group that was asleep\n"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
