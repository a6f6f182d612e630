# A Python HTTP server on the node's IPv6 address. The client declares the
# address as a host network:
#
#   client {
#     host_network "v6" {
#       cidr = "2001:db8:1::/64"
#     }
#   }
#
#   nomad job run -var node=$(nomad node status -self -t '{{.Name}}') examples/jobs/ipv6.nomad.hcl

variable "node" {
  type        = string
  description = "Name of the Nomad node to run on: a sleeping service must wake at the same address."
}

variable "port" {
  type    = number
  default = 8085
}

variable "idle_timeout" {
  type    = string
  default = "10m"
}

variable "ready" {
  type    = string
  default = "listen"
}

variable "host_network" {
  type        = string
  description = "The client's host_network holding its IPv6 address."
  default     = "v6"
}

job "ipv6" {
  datacenters = ["*"]

  constraint {
    attribute = "${node.unique.name}"
    value     = var.node
  }

  group "ipv6" {
    count = 1

    network {
      port "http" {
        static       = var.port
        host_network = var.host_network
      }
    }

    service {
      name = "ipv6"
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
        args    = ["-m", "http.server", "--bind", "${NOMAD_IP_http}", "--directory", "${NOMAD_TASK_DIR}", "${NOMAD_PORT_http}"]
      }

      template {
        destination = "local/index.html"
        data        = "hello from an IPv6 service that was asleep\n"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
