# A docker container that sleeps when idle and wakes on the first connection:
# busybox's httpd, behind docker's port mapping (the node's address and static
# port forwarded to port 8080 inside the container).
#
#   nomad job run -var node=$(nomad node status -self -t '{{.Name}}') examples/jobs/docker.nomad.hcl

variable "node" {
  type        = string
  description = "Name of the Nomad node to run on: a sleeping service must wake at the same address."
}

variable "port" {
  type    = number
  default = 8083
}

variable "idle_timeout" {
  type    = string
  default = "10m"
}

variable "ready" {
  type    = string
  default = "listen"
}

variable "image" {
  type        = string
  description = "Any image with busybox's httpd at /bin/httpd."
  default     = "busybox:1.36"
}

job "docker" {
  datacenters = ["*"]

  constraint {
    attribute = "${node.unique.name}"
    value     = var.node
  }

  group "docker" {
    count = 1

    network {
      port "http" {
        static = var.port
        to     = 8080
      }
    }

    service {
      name = "docker"
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
      driver = "docker"

      config {
        image   = var.image
        command = "/bin/httpd"
        # The task's local/ directory is mounted at /local.
        args  = ["-f", "-p", "8080", "-h", "/local"]
        ports = ["http"]
        # As PID 1, httpd would ignore the stop signal and hold the static
        # port until kill_timeout: a wake right after a scale-down would
        # wait for it. docker-init passes the signal on.
        init = true
      }

      template {
        destination = "local/index.html"
        data        = "hello from a container that was asleep\n"
      }

      resources {
        cpu    = 100
        memory = 32
      }
    }
  }
}
