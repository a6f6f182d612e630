# Gating works for any driver: the same Python server under raw_exec.
# (raw_exec must be enabled on the client: plugin "raw_exec" { config { enabled = true } })

variable "node" {
  type        = string
  description = "Name of the Nomad node to run on: a sleeping service must wake at the same address."
}

variable "port" {
  type    = number
  default = 8082
}

variable "idle_timeout" {
  type    = string
  default = "10m"
}

job "raw" {
  datacenters = ["*"]

  constraint {
    attribute = "${node.unique.name}"
    value     = var.node
  }

  group "raw" {
    # Set count: with a scaling block an unset count means scaling.min (0).
    count = 1

    network {
      port "http" {
        static = var.port
      }
    }

    service {
      name = "raw"
      port = "http"

      check {
        type     = "tcp"
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
        }
      }
    }

    task "server" {
      driver = "raw_exec"

      config {
        command = "/usr/bin/python3"
        args    = ["-m", "http.server", "${NOMAD_PORT_http}", "--bind", "${NOMAD_IP_http}", "--directory", "${NOMAD_TASK_DIR}"]
      }

      template {
        destination = "local/index.html"
        data        = "raw_exec service, gated all the same\n"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
