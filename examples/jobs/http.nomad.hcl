# A Python HTTP server that sleeps when idle and wakes on the first connection.
#
#   nomad job run -var node=$(nomad node status -self -t '{{.Name}}') examples/jobs/http.nomad.hcl

variable "node" {
  type        = string
  description = "Name of the Nomad node to run on: a sleeping service must wake at the same address."
}

variable "port" {
  type    = number
  default = 8080
}

variable "idle_timeout" {
  type    = string
  default = "10m"
}

job "http" {
  datacenters = ["*"]

  # Pin the group to one node so it comes back at the same address.
  constraint {
    attribute = "${node.unique.name}"
    value     = var.node
  }

  group "http" {
    count = 1

    network {
      port "http" {
        static = var.port
      }
    }

    service {
      name = "http"
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
          ready        = "listen"
        }
      }
    }

    task "server" {
      driver = "zeroscale"

      config {
        command = "/usr/bin/python3"
        args    = ["-m", "http.server", "${NOMAD_PORT_http}", "--bind", "${NOMAD_IP_http}", "--directory", "${NOMAD_TASK_DIR}"]
      }

      template {
        destination = "local/index.html"
        data        = "hello from a service that was asleep\n"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
