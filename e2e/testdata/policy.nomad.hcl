# One instance on each of the nodes named, at the same static port on each
# node's address (every node gates its own address), with the operator's
# policy fields as variables: awake_during, wake_with, max (at least the
# number of nodes). Tests run it under other job names by rewriting the
# job's label.

variable "nodes" {
  type        = list(string)
  description = "Names of the Nomad nodes to run on, one instance each."
}

variable "awake_during" {
  type    = list(string)
  default = []
}

variable "wake_with" {
  type    = list(string)
  default = []
}

variable "max" {
  type    = number
  default = 1
}

variable "port" {
  type = number
}

variable "idle_timeout" {
  type    = string
  default = "10s"
}

job "policy" {
  datacenters = ["*"]

  constraint {
    attribute = "${node.unique.name}"
    operator  = "set_contains_any"
    value     = join(",", var.nodes)
  }

  constraint {
    operator = "distinct_hosts"
    value    = "true"
  }

  group "web" {
    count = length(var.nodes)

    network {
      port "http" {
        static = var.port
      }
    }

    service {
      name = "${NOMAD_JOB_NAME}"
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
      max     = var.max

      policy {
        zeroscale {
          idle_timeout = var.idle_timeout
          wake_count   = length(var.nodes)
          wake_timeout = "60s"
          awake_during = var.awake_during
          wake_with    = var.wake_with
        }
      }
    }

    task "server" {
      driver = "raw_exec"

      config {
        command = "/usr/bin/python3"
        args    = ["${NOMAD_TASK_DIR}/serve.py", "${NOMAD_IP_http}", "${NOMAD_PORT_http}", "${NOMAD_TASK_DIR}"]
      }

      # http.server with a listen backlog that takes a storm (its default
      # is 5), and without its reverse DNS lookup of the address between
      # bind() and listen() (10 s where no resolver answers).
      template {
        destination = "local/serve.py"
        data        = <<-EOT
          import functools, http.server, socketserver, sys
          class Server(http.server.ThreadingHTTPServer):
              request_queue_size = 512
              def server_bind(self):
                  socketserver.TCPServer.server_bind(self)
                  self.server_name, self.server_port = self.server_address[:2]
          handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
          Server((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
        EOT
      }

      template {
        destination = "local/index.html"
        data        = "served by {{ env \"node.unique.name\" }}\n"
      }

      resources {
        cpu    = 50
        memory = 48
      }
    }
  }
}
