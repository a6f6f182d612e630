# nginx (Debian's nginx-light) that sleeps when idle and wakes on connect.
#
#   apt-get install nginx-light
#   nomad job run -var node=$(nomad node status -self -t '{{.Name}}') examples/jobs/nginx.nomad.hcl

variable "node" {
  type        = string
  description = "Name of the Nomad node to run on: a sleeping service must wake at the same address."
}

variable "port" {
  type    = number
  default = 8081
}

variable "idle_timeout" {
  type    = string
  default = "10m"
}

job "nginx" {
  datacenters = ["*"]

  constraint {
    attribute = "${node.unique.name}"
    value     = var.node
  }

  group "nginx" {
    # Set count: with a scaling block an unset count means scaling.min (0).
    count = 1

    network {
      port "http" {
        static = var.port
      }
    }

    service {
      name = "nginx"
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
      max     = 2

      policy {
        zeroscale {
          idle_timeout = var.idle_timeout
          wake_count   = 1
          ready        = "listen"
        }
      }
    }

    task "nginx" {
      driver = "zeroscale"

      config {
        command = "/usr/sbin/nginx"
        args    = ["-c", "${NOMAD_TASK_DIR}/nginx.conf", "-p", "${NOMAD_TASK_DIR}", "-e", "stderr"]
      }

      template {
        destination = "local/nginx.conf"
        data        = <<-CONF
          daemon off;
          worker_processes 1;
          pid {{ env "NOMAD_TASK_DIR" }}/nginx.pid;
          error_log stderr warn;
          events {
            worker_connections 512;
          }
          http {
            access_log off;
            client_body_temp_path {{ env "NOMAD_TASK_DIR" }}/body;
            proxy_temp_path       {{ env "NOMAD_TASK_DIR" }}/proxy;
            fastcgi_temp_path     {{ env "NOMAD_TASK_DIR" }}/fastcgi;
            uwsgi_temp_path       {{ env "NOMAD_TASK_DIR" }}/uwsgi;
            scgi_temp_path        {{ env "NOMAD_TASK_DIR" }}/scgi;
            server {
              listen {{ env "NOMAD_ADDR_http" }};
              root {{ env "NOMAD_TASK_DIR" }}/www;
            }
          }
        CONF
      }

      template {
        destination = "local/www/index.html"
        data        = "nginx woke up for you\n"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
