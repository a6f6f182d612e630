# PostgreSQL (Debian's postgresql) that sleeps when idle and wakes on the
# first connection. The data directory lives in the allocation and is created
# with initdb on first start; with a sticky ephemeral disk Nomad carries it
# over to the next allocation on the same node when it can. For data that
# must survive anything, use a host volume instead.
#
#   apt-get install postgresql
#   nomad job run -var node=$(nomad node status -self -t '{{.Name}}') examples/jobs/postgres.nomad.hcl
#   psql -h <node address> -p 5433 -U postgres -c 'select 1'

variable "node" {
  type        = string
  description = "Name of the Nomad node to run on: a sleeping service must wake at the same address."
}

variable "port" {
  type    = number
  default = 5433
}

variable "idle_timeout" {
  type    = string
  default = "10m"
}

variable "pg_bin" {
  type    = string
  default = "/usr/lib/postgresql/15/bin"
}

job "postgres" {
  datacenters = ["*"]

  constraint {
    attribute = "${node.unique.name}"
    value     = var.node
  }

  group "postgres" {
    # Set count: with a scaling block an unset count means scaling.min (0).
    count = 1

    ephemeral_disk {
      sticky  = true
      migrate = true
      size    = 300
    }

    network {
      port "pg" {
        static = var.port
      }
    }

    service {
      name = "postgres"
      port = "pg"

      # PostgreSQL listens before it accepts queries ("the database system
      # is starting up"), so readiness is its own check, not the listener.
      check {
        type     = "script"
        task     = "postgres"
        command  = "${var.pg_bin}/pg_isready"
        args     = ["-q", "-h", "${NOMAD_IP_pg}", "-p", "${NOMAD_PORT_pg}"]
        interval = "1s"
        timeout  = "2s"
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
          ready        = "healthy"
        }
      }
    }

    task "postgres" {
      driver = "zeroscale"
      user   = "postgres" # PostgreSQL refuses to run as root

      config {
        command = "/bin/sh"
        args    = ["${NOMAD_TASK_DIR}/start.sh"]
      }

      env {
        PG_BIN = var.pg_bin
      }

      template {
        destination = "local/start.sh"
        perms       = "0755"
        data        = <<-SH
          #!/bin/sh
          set -e
          PGDATA="$NOMAD_ALLOC_DIR/data/pgdata"
          if [ ! -f "$PGDATA/PG_VERSION" ]; then
            "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust >/dev/null
            # An example: trust every client. Use real authentication in production.
            echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
            echo "host all all ::/0 trust" >> "$PGDATA/pg_hba.conf"
          fi
          # TCP only: Unix socket paths under a deep data_dir exceed 107 bytes.
          exec "$PG_BIN/postgres" -D "$PGDATA" -c unix_socket_directories= \
            -c listen_addresses="$NOMAD_IP_pg" -c port="$NOMAD_PORT_pg"
        SH
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
