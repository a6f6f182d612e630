package bpf

// The committed zeroscale_bpfel.{go,o} let `go build` work without clang;
// `make generate` rebuilds them after a change under c/.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type gate_key -type gate_policy -type gate_stats -type sock_activity -type gate_config -type lpm_key -type flow_key -type syn_flow -type event -type ns_port -type checker_peer -type replay_target -type probe_query -type probe_answer zeroscale c/zeroscale.c -- -I./c
