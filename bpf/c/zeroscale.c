//go:build ignore

// zeroscale data plane:
//   zs_gate        XDP gate keyed on (local addr, port, proto) of Consul services
//   zs_sock_state  tp_btf/inet_sock_set_state: per-service activity and listen events
//   zs_udp_recv    tp_btf/sock_recv_length: datagrams read by UDP services behind a
//                  port mapping (the gate on the node sees the rest)
//   zs_replay      XDP program run through BPF_PROG_RUN (live frames) to re-inject
//                  a captured SYN or held datagram once the service listens
//   zs_probe       tc program run through BPF_PROG_RUN: is a socket bound at an
//                  address, and whose is it (UDP has no listen transition to trace)

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "kernel.h"

char __license[] SEC("license") = "Dual MPL/GPL";

#define GATE_OPEN 1
#define GATE_PARKED 2
#define GATE_MOVED 3

#define EVENT_WAKE 1
#define EVENT_CAPTURE 2
#define EVENT_LISTEN 4

#define CFG_WAKE_FROM 1
#define CFG_CAPTURE 2

#define CAPTURE_BYTES 128
// A held datagram is replayed whole, so its record carries up to this many
// bytes of frame; a longer one wakes the service but is not held.
#define DGRAM_BYTES 1536
// Datagrams held per client flow (address and port) while the service sleeps:
// a resolver's retries, a few log lines.
#define DGRAM_HOLD_PER_FLOW 4
#define LOOPBACK_IFINDEX 1
#define MAX_VLAN 2
#define MAX_V6_EXT 6
#define DEFAULT_REPORT_INTERVAL_NS 100000000ULL

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

// TCP states (include/net/tcp_states.h is not uapi).
#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_CLOSE 7
#define ST_LISTEN 10

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef IP_MF
#define IP_MF 0x2000
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1FFF
#endif

// Addresses are 16 bytes; IPv4 is stored v4-mapped (::ffff:a.b.c.d).
struct gate_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

// Written by userspace (state) and the kernel (report stamp, capture count).
struct gate_policy {
	__u32 state;
	__u32 captured;
	__u64 last_report_ns;
};

// Per-CPU, written only by the gate.
struct gate_stats {
	__u64 packets;
	__u64 bytes;
	__u64 last_seen_ns;
	__u64 syns_dropped;
	__u64 reports;
	__u64 rsts;
	__u64 denied;
	__u64 captured;
	__u64 check_syns;
};

// Socket-level activity of one service address, updated with atomics.
struct sock_activity {
	__s64 established;
	__u64 opened;
	__u64 closed;
	__u64 checks;
	__u64 bytes;
	__u64 last_active_ns;
	__u64 last_check_ns;
};

struct gate_config {
	__u64 report_interval_ns;
	__u64 syn_max_age_ns;
	__u32 flags;
	__u32 max_capture;
	__u32 netns_inum;
	__u32 pad;
};

struct lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

// One client connection attempt as the server sees it.
struct flow_key {
	struct gate_key dst;
	__u8 saddr[16];
	__be16 sport;
	__u16 pad;
};

struct syn_flow {
	__u64 first_ns;
	__u32 passed;
	__u32 held; // UDP: datagrams of this flow held so far
};

struct event {
	__u32 kind;
	__u32 ifindex;
	__u64 ts_ns;
	struct gate_key key;
	__u8 saddr[16];
	__be16 sport;
	__u16 pad;
	__u32 frame_len;
	__u32 cap_len;
	__u8 frame[CAPTURE_BYTES];
	// Listen events only: who listens. Appended so that records of the
	// earlier, shorter layout still decode (with these fields zero).
	__u64 cgroup_id; // cgroup v2 id: the inode of the cgroup's directory
	__u32 tgid;      // process id, as the initial pid namespace sees it
	__u32 netns;     // the listener's network namespace (its inode number)
};

// A datagram's record: the event, then the frame's bytes past the first
// CAPTURE_BYTES (event.cap_len counts both parts).
struct dgram_event {
	struct event ev;
	__u8 rest[DGRAM_BYTES - CAPTURE_BYTES];
};

// A port inside an allocation's own network namespace (docker, Nomad bridge
// mode), reached from the node through a port mapping.
struct ns_port {
	__u32 netns;
	__be16 port;
	__u16 pad;
};

// A health checker's end of a connection: its namespace and source address.
// Port mappings rewrite the destination, never this end.
struct checker_peer {
	__u32 netns;
	__be16 port;
	__u16 pad;
	__u8 addr[16];
};

// Where zs_replay looks for the listener when the service lives behind a
// port mapping in another namespace.
#define REPLAY_LOOKUP_IN_NETNS 1
// The address forwards (the kernel's NAT takes the SYN to where the service
// woke): no listener here to look for.
#define REPLAY_FORWARD 2
struct replay_target {
	__s32 netns_id; // the namespace's id as the gated interface's namespace knows it
	__u32 set;      // REPLAY_LOOKUP_IN_NETNS or REPLAY_FORWARD; 0: look here
	__u8 addr[16]; // the listener's address, unspecified for a wildcard listener
	__be16 port;
	__u16 pad;
};

// Referenced so that bpf2go emits a Go type for ring buffer records.
const struct event *unused_event __attribute__((unused));

enum counter {
	C_PACKETS,
	C_NOT_TCP,
	C_MALFORMED,
	C_FRAGMENT,
	C_MISS,
	C_OPEN,
	C_PARKED_DROP,
	C_PARKED_PASS,
	C_REPORTED,
	C_SUPPRESSED,
	C_DENIED,
	C_CAPTURED,
	C_CAPTURE_LIMIT,
	C_RINGBUF_FULL,
	C_RST_SENT,
	C_RST_FAILED,
	C_MOVED_PASS,
	C_LISTEN_EVENTS,
	C_CHECK_CONNS,
	C_COUNTED_CONNS,
	C_REPLAY_PASSED,
	C_REPLAY_NO_LISTENER,
	C_REPLAY_CONNECTED,
	C_REPLAY_UNPARSEABLE,
	C_CHECK_SYN_PASSED,
	C_DGRAM_OPEN,
	C_DGRAM_ACTIVITY,
	C_DGRAM_IGNORED,
	C_PARKED_DGRAM_DROP,
	C_DGRAM_HELD,
	C_DGRAM_HOLD_LIMIT,
	C_DGRAM_TOO_LONG,
	C_DGRAM_NS_ACTIVITY,
	C_MAX,
};

enum replay_result {
	REPLAY_NONE,
	REPLAY_PASSED,
	REPLAY_NO_LISTENER,
	REPLAY_CONNECTED,
	REPLAY_UNPARSEABLE,
};


struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct gate_key);
	__type(value, struct gate_policy);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	// Allocated as addresses are gated, not all up front (stats is
	// per CPU: preallocated, 65536 entries cost megabytes per CPU).
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct gate_key);
	__type(value, struct gate_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct gate_key);
	__type(value, struct sock_activity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} activity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gate_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wake_from SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ignore_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, char[16]);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} checker_comms SEC(".maps");

// Sockets opened by a checker process, until they are connected.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} checker_socks SEC(".maps");

// Connections made by checker processes, keyed by the checker's end.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct checker_peer);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} checker_peers SEC(".maps");

// Ports in allocations' namespaces, and the service address on the node that
// maps to each: sockets there count as that address's activity.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ns_port);
	__type(value, struct gate_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ns_ports SEC(".maps");

// Server sockets counted in `activity`, so each is uncounted exactly once.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct gate_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counted_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct syn_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} syn_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u16);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} listen_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} replay_result SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct replay_target);
} replay_targets SEC(".maps");

// zs_probe's question: is a socket of proto bound at addr:port, in the
// node's namespace or (in_netns) in the namespace netns_id?
struct probe_query {
	__s32 netns_id;
	__u32 in_netns;
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct probe_answer {
	__u32 found;
	__u32 state; // the socket's state (TCP: 10 for a listener)
	__u64 cgroup_id;
	__u64 inode; // the socket's inode: /proc/<pid>/fd names it "socket:[inode]"
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_query);
} probe_queries SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_answer);
} probe_answers SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline struct gate_config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config, &zero);
}

static __always_inline void map_v4(__u8 *dst, __be32 addr)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr, 4);
}

static __always_inline int is_v4_mapped(const __u8 *a)
{
	__u64 lo;
	__u32 mid;
	__builtin_memcpy(&lo, a, 8);
	__builtin_memcpy(&mid, a + 8, 4);
	return lo == 0 && mid == bpf_htonl(0x0000ffff);
}

/* ---------------------------------------------------------------- parsing */

enum parse_result {
	PARSE_OK,
	PARSE_NOT_TCP,
	PARSE_MALFORMED,
	PARSE_FRAGMENT,
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

struct pkt {
	struct gate_key key; // destination: the local service address
	__u8 saddr[16];
	__be16 sport;
	__u8 flags; // TCP flags; 0 for UDP
	__u8 is_v6;
	__u32 l2_len;
	__u32 seq;
	__u32 payload_len;
};

static __always_inline int is_udp(const struct pkt *p)
{
	return p->key.proto == IPPROTO_UDP;
}

// parse reads Ethernet (with up to two VLAN tags), IPv4 or IPv6 (with
// extension headers) and TCP or UDP. Anything else is reported as not
// understood and the caller passes it; nothing is read past data_end.
// len is the whole packet's length from data on: in tc the payload may sit
// in fragments beyond data_end.
static __always_inline int parse(void *data, void *data_end, __u32 len, struct pkt *p)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return PARSE_MALFORMED;

	__be16 proto = eth->h_proto;
	void *cur = eth + 1;

#pragma unroll
	for (int i = 0; i < MAX_VLAN; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_hdr *vh = cur;
		if ((void *)(vh + 1) > data_end)
			return PARSE_MALFORMED;
		proto = vh->encap_proto;
		cur = vh + 1;
	}
	p->l2_len = cur - data;

	void *l4h;      // the TCP or UDP header
	__u8 l4;        // IPPROTO_TCP or IPPROTO_UDP
	__u32 l4_room; // bytes from the TCP or UDP header to the end of the IP payload

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > data_end)
			return PARSE_MALFORMED;
		if (ip->version != 4 || ip->ihl < 5)
			return PARSE_MALFORMED;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return PARSE_NOT_TCP;
		if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
			return PARSE_FRAGMENT;
		__u32 ihl = ip->ihl * 4;
		__u32 tot = bpf_ntohs(ip->tot_len);
		l4 = ip->protocol;
		if (tot < ihl + (l4 == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr)))
			return PARSE_MALFORMED;
		// A frame shorter than its IP length is truncated: not ours to read.
		if ((__u64)(cur - data) + tot > len)
			return PARSE_MALFORMED;
		l4h = cur + ihl;
		l4_room = tot - ihl;
		map_v4(p->key.addr, ip->daddr);
		map_v4(p->saddr, ip->saddr);
		p->is_v6 = 0;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > data_end)
			return PARSE_MALFORMED;
		if (ip6->version != 6)
			return PARSE_MALFORMED;
		if ((__u64)((void *)(ip6 + 1) - data) + bpf_ntohs(ip6->payload_len) > len)
			return PARSE_MALFORMED;
		__u8 nh = ip6->nexthdr;
		void *h = ip6 + 1;
		__u32 ext_len = 0;
#pragma unroll
		for (int i = 0; i < MAX_V6_EXT; i++) {
			if (nh == IPPROTO_TCP || nh == IPPROTO_UDP)
				break;
			if (nh == IPPROTO_FRAGMENT)
				return PARSE_FRAGMENT;
			if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
			    nh != IPPROTO_AH)
				return PARSE_NOT_TCP;
			__u8 *ext = h;
			if ((void *)(ext + 8) > data_end)
				return PARSE_MALFORMED;
			__u32 len = nh == IPPROTO_AH ? ((__u32)ext[1] + 2) * 4 : ((__u32)ext[1] + 1) * 8;
			nh = ext[0];
			h += len;
			ext_len += len;
		}
		if (nh != IPPROTO_TCP && nh != IPPROTO_UDP)
			return PARSE_NOT_TCP;
		l4 = nh;
		l4h = h;
		__u32 plen = bpf_ntohs(ip6->payload_len);
		if (plen < ext_len + (l4 == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr)))
			return PARSE_MALFORMED;
		l4_room = plen - ext_len;
		__builtin_memcpy(p->key.addr, &ip6->daddr, 16);
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		// v4-mapped addresses must not appear on the wire (RFC 4291 2.5.5.2);
		// they would alias IPv4 keys, so leave such packets to the stack.
		if (is_v4_mapped(p->key.addr))
			return PARSE_NOT_TCP;
		p->is_v6 = 1;
	} else {
		return PARSE_NOT_TCP;
	}

	p->key.pad = 0;
	if (l4 == IPPROTO_UDP) {
		struct udphdr *udp = l4h;
		if ((void *)(udp + 1) > data_end)
			return PARSE_MALFORMED;
		// The UDP length must cover its header and fit the IP payload.
		__u32 ulen = bpf_ntohs(udp->len);
		if (ulen < sizeof(struct udphdr) || ulen > l4_room)
			return PARSE_MALFORMED;
		p->key.port = udp->dest;
		p->key.proto = IPPROTO_UDP;
		p->sport = udp->source;
		p->flags = 0;
		p->seq = 0;
		p->payload_len = ulen - sizeof(struct udphdr);
		return PARSE_OK;
	}
	struct tcphdr *tcp = l4h;
	if ((void *)(tcp + 1) > data_end)
		return PARSE_MALFORMED;
	__u32 doff = tcp->doff * 4;
	if (doff < sizeof(struct tcphdr) || doff > l4_room)
		return PARSE_MALFORMED;
	p->key.port = tcp->dest;
	p->key.proto = IPPROTO_TCP;
	p->sport = tcp->source;
	p->flags = ((__u8 *)tcp)[13];
	p->seq = bpf_ntohl(tcp->seq);
	p->payload_len = l4_room - doff;
	return PARSE_OK;
}

static __always_inline int is_pure_syn(const struct pkt *p)
{
	return p->key.proto == IPPROTO_TCP && (p->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_SYN;
}

static __always_inline void flow_of(struct flow_key *fk, const struct pkt *p)
{
	__builtin_memset(fk, 0, sizeof(*fk));
	fk->dst = p->key;
	__builtin_memcpy(fk->saddr, p->saddr, 16);
	fk->sport = p->sport;
}

/* ---------------------------------------------------------------- checksums */

static __always_inline __u16 csum_fold(__s64 csum)
{
	__u32 sum = (__u32)csum;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

struct pseudo_v4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

struct pseudo_v6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__u8 zero[3];
	__u8 proto;
};

/* ---------------------------------------------------------------- gate */

// frame describes the packet being judged, for the XDP and tc entry points.
struct frame {
	void *ctx;
	void *data;
	void *data_end;
	__u32 len; // whole packet, fragments included
	__u32 ifindex;
	__u8 is_tc; // ctx is an skb (tc), not an xdp_md
};

static __always_inline void event_header(struct event *ev, const struct frame *f, __u32 kind, const struct pkt *p,
					 __u64 now)
{
	ev->kind = kind;
	ev->ifindex = f->ifindex;
	ev->ts_ns = now;
	ev->key = p->key;
	__builtin_memcpy(ev->saddr, p->saddr, 16);
	ev->sport = p->sport;
	ev->pad = 0;
	ev->frame_len = f->len;
	ev->cap_len = 0;
	// Ring buffer space is not zeroed, and XDP runs in no process's context.
	ev->cgroup_id = 0;
	ev->tgid = 0;
	ev->netns = 0;
}

static __always_inline void emit_event(const struct frame *f, __u32 kind, const struct pkt *p, __u64 now)
{
	void *data = f->data;
	void *data_end = f->data_end;

	struct event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev) {
		count(C_RINGBUF_FULL);
		return;
	}
	event_header(ev, f, kind, p, now);
	__u32 n = 0;
#pragma unroll
	for (int i = 0; i < CAPTURE_BYTES; i++) {
		__u8 *b = data + i;
		if ((void *)(b + 1) > data_end)
			break;
		ev->frame[i] = *b;
		n++;
	}
	ev->cap_len = n;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline long load_bytes(const struct frame *f, __u32 off, void *to, __u32 len)
{
	if (f->is_tc)
		return bpf_skb_load_bytes(f->ctx, off, to, len);
	// Before Linux 5.18 XDP has no such helper (and no replay either):
	// the branch is cut at load time, and nothing is held.
	if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_xdp_load_bytes))
		return -1;
	return bpf_xdp_load_bytes(f->ctx, off, to, len);
}

// emit_dgram reports a held datagram with its whole frame (the caller checked
// that it fits), read with the load helpers: in tc and in multi-buffer XDP
// the payload may lie beyond the linear part.
static __always_inline void emit_dgram(const struct frame *f, __u32 kind, const struct pkt *p, __u64 now)
{
	struct dgram_event *d = bpf_ringbuf_reserve(&events, sizeof(*d), 0);
	if (!d) {
		count(C_RINGBUF_FULL);
		return;
	}
	event_header(&d->ev, f, kind, p, now);
	// Lengths less one, masked, so the verifier sees each in [1, room].
	__u32 head = ((f->len < CAPTURE_BYTES ? f->len : CAPTURE_BYTES) - 1) & 0x7f;
	__u32 got = 0;
	if (f->len >= 1 && load_bytes(f, 0, d->ev.frame, head + 1) == 0) {
		got = head + 1;
		__u32 rest = (f->len - CAPTURE_BYTES - 1) & 0x7ff;
		if (f->len > CAPTURE_BYTES && rest < DGRAM_BYTES - CAPTURE_BYTES &&
		    load_bytes(f, CAPTURE_BYTES, d->rest, rest + 1) == 0)
			got += rest + 1;
	}
	// A short cap_len marks the frame incomplete: it wakes, but is not replayed.
	d->ev.cap_len = got;
	bpf_ringbuf_submit(d, 0);
}

// ignored_source tells a peer in ignore_sources (a remote checker): its
// traffic is never activity and never wakes.
static __always_inline int ignored_source(const __u8 *saddr)
{
	struct lpm_key lk = {.prefixlen = 128};
	__builtin_memcpy(lk.addr, saddr, 16);
	return bpf_map_lookup_elem(&ignore_sources, &lk) != 0;
}

// may_wake applies wake_from to a packet's source.
static __always_inline int may_wake(const struct gate_config *cfg, const struct pkt *p)
{
	if (!cfg || !(cfg->flags & CFG_WAKE_FROM))
		return 1;
	struct lpm_key lk = {.prefixlen = 128};
	__builtin_memcpy(lk.addr, p->saddr, 16);
	return bpf_map_lookup_elem(&wake_from, &lk) != 0;
}

// report_wake stamps the policy so that a burst on all CPUs reports once per
// interval; it returns EVENT_WAKE for the packet that reports.
static __always_inline __u32 report_wake(const struct gate_config *cfg, struct gate_policy *pol, struct gate_stats *st,
					 __u64 now)
{
	__u64 interval = cfg && cfg->report_interval_ns ? cfg->report_interval_ns : DEFAULT_REPORT_INTERVAL_NS;
	__u64 last = pol->last_report_ns;
	if ((last == 0 || now - last >= interval) &&
	    __sync_val_compare_and_swap(&pol->last_report_ns, last, now) == last) {
		count(C_REPORTED);
		if (st)
			st->reports++;
		return EVENT_WAKE;
	}
	count(C_SUPPRESSED);
	return 0;
}

// is_check_syn tells a SYN that a health checker sent: from an ignored
// source, or from a local socket that a checker process opened (looked up by
// the reversed tuple: the connecting socket is hashed before its SYN leaves).
static __always_inline int is_check_syn(const struct frame *f, const struct pkt *p)
{
	if (ignored_source(p->saddr))
		return 1;

	// Local processes' packets arrive on the loopback device (ifindex 1 in
	// every namespace); only they can come from a checker's socket here.
	if (f->ifindex != LOOPBACK_IFINDEX)
		return 0;

	struct bpf_sock_tuple t = {};
	__u32 size;
	if (p->is_v6) {
		__builtin_memcpy(t.ipv6.saddr, p->key.addr, 16);
		__builtin_memcpy(t.ipv6.daddr, p->saddr, 16);
		t.ipv6.sport = p->key.port;
		t.ipv6.dport = p->sport;
		size = sizeof(t.ipv6);
	} else {
		__builtin_memcpy(&t.ipv4.saddr, p->key.addr + 12, 4);
		__builtin_memcpy(&t.ipv4.daddr, p->saddr + 12, 4);
		t.ipv4.sport = p->key.port;
		t.ipv4.dport = p->sport;
		size = sizeof(t.ipv4);
	}
	struct bpf_sock *sk = bpf_skc_lookup_tcp(f->ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	__u64 skp = (__u64)sk;
	bpf_sk_release(sk);
	return bpf_map_lookup_elem(&checker_socks, &skp) != 0;
}

enum verdict {
	V_PASS,
	V_DROP,
	V_RST,
};

// denied drops a packet from a source outside wake_from: no wake, no hold.
static __always_inline int denied(struct gate_stats *st)
{
	if (st)
		st->denied++;
	count(C_DENIED);
	return V_DROP;
}

// parked_drop counts a SYN or datagram dropped at a parked address and
// returns EVENT_WAKE if it is the one that reports.
static __always_inline __u32 parked_drop(const struct gate_config *cfg, struct gate_policy *pol, struct gate_stats *st,
					 __u64 now, __u32 counter)
{
	if (st)
		st->syns_dropped++;
	count(counter);
	return report_wake(cfg, pol, st, now);
}

static __always_inline int parked_syn(const struct frame *f, const struct pkt *p, struct gate_policy *pol,
				      struct gate_stats *st, __u64 now)
{
	struct gate_config *cfg = get_config();

	// Health checks must not wake a parked service, but must see the truth:
	// a SYN from a local checker process (its socket was marked when it
	// connected) or from an ignored source passes without a report. While
	// the service is down the stack refuses it; while it wakes the check
	// reaches it (with ready = "healthy" that is how it becomes ready).
	if (is_check_syn(f, p)) {
		if (st)
			st->check_syns++;
		count(C_CHECK_SYN_PASSED);
		return V_PASS;
	}

	if (!may_wake(cfg, p))
		return denied(st);
	__u32 kind = parked_drop(cfg, pol, st, now, C_PARKED_DROP);

	if (cfg && (cfg->flags & CFG_CAPTURE)) {
		struct flow_key fk;
		flow_of(&fk, p);
		struct syn_flow *seen = bpf_map_lookup_elem(&syn_flows, &fk);
		if (!seen || now - seen->first_ns > cfg->syn_max_age_ns) {
			struct syn_flow fresh = {.first_ns = now};
			if (pol->captured >= cfg->max_capture) {
				count(C_CAPTURE_LIMIT);
			} else if (bpf_map_update_elem(&syn_flows, &fk, &fresh, BPF_ANY) == 0) {
				__sync_fetch_and_add(&pol->captured, 1);
				kind |= EVENT_CAPTURE;
				count(C_CAPTURED);
				if (st)
					st->captured++;
			}
		}
	}

	if (kind)
		emit_event(f, kind, p, now);
	return V_DROP;
}

// parked_dgram judges a datagram to a parked UDP address: every datagram may
// be a client's first, so each one reports (rate-limited) and the first few of
// each flow are held for replay; none reaches the stack, which would answer
// "port unreachable" while the service sleeps.
static __always_inline int parked_dgram(const struct frame *f, const struct pkt *p, struct gate_policy *pol,
					struct gate_stats *st, __u64 now)
{
	struct gate_config *cfg = get_config();

	// A remote checker sees the truth and wakes nothing, as with SYNs.
	if (ignored_source(p->saddr)) {
		if (st)
			st->check_syns++;
		count(C_DGRAM_IGNORED);
		return V_PASS;
	}
	if (!may_wake(cfg, p))
		return denied(st);
	__u32 kind = parked_drop(cfg, pol, st, now, C_PARKED_DGRAM_DROP);

	if (cfg && (cfg->flags & CFG_CAPTURE)) {
		int hold = 0;
		struct flow_key fk;
		flow_of(&fk, p);
		struct syn_flow *seen = bpf_map_lookup_elem(&syn_flows, &fk);
		int fresh_flow = !seen || now - seen->first_ns > cfg->syn_max_age_ns;
		if (f->len > DGRAM_BYTES) {
			count(C_DGRAM_TOO_LONG);
		} else if (!fresh_flow && seen->held >= DGRAM_HOLD_PER_FLOW) {
			count(C_DGRAM_HOLD_LIMIT);
		} else if (pol->captured >= cfg->max_capture) {
			count(C_CAPTURE_LIMIT);
		} else if (fresh_flow) {
			struct syn_flow first = {.first_ns = now, .held = 1};
			hold = bpf_map_update_elem(&syn_flows, &fk, &first, BPF_ANY) == 0;
		} else {
			__sync_fetch_and_add(&seen->held, 1);
			hold = 1;
		}
		if (hold) {
			__sync_fetch_and_add(&pol->captured, 1);
			kind |= EVENT_CAPTURE;
			count(C_DGRAM_HELD);
			if (st)
				st->captured++;
		}
	}

	if (kind & EVENT_CAPTURE)
		emit_dgram(f, kind, p, now);
	else if (kind)
		emit_event(f, kind, p, now);
	return V_DROP;
}

// dgram_activity counts a datagram to an open UDP address as the service's
// activity: UDP has no connection for the socket programs to count.
static __always_inline void dgram_activity(const struct pkt *p, __u64 now)
{
	count(C_DGRAM_OPEN);
	if (ignored_source(p->saddr)) {
		count(C_DGRAM_IGNORED);
		return;
	}
	struct sock_activity *a = bpf_map_lookup_elem(&activity, &p->key);
	if (!a)
		return;
	a->last_active_ns = now;
	__sync_fetch_and_add(&a->bytes, p->payload_len);
	count(C_DGRAM_ACTIVITY);
}

// A RST answers a SYN to an address whose service woke elsewhere, so the
// client fails fast and re-resolves (RFC 9293 3.10.7.1: the SYN has no ACK,
// so seq 0 and ack = seq + segment length).
struct rst_info {
	__u8 smac[ETH_ALEN];
	__u8 dmac[ETH_ALEN];
	__u8 saddr[16]; // the client
	__u8 daddr[16]; // the service
	__be16 sport;
	__be16 dport;
	__u32 ack;
	__u32 l2;
	__u32 len; // the RST's frame length
	__u8 is_v6;
};

static __always_inline int rst_prepare(const struct frame *f, const struct pkt *p, struct rst_info *ri)
{
	struct ethhdr *eth = f->data;
	if ((void *)(eth + 1) > f->data_end)
		return -1;
	__builtin_memcpy(ri->smac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(ri->dmac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(ri->saddr, p->saddr, 16);
	__builtin_memcpy(ri->daddr, p->key.addr, 16);
	ri->sport = p->sport;
	ri->dport = p->key.port;
	ri->ack = p->seq + 1 + p->payload_len + ((p->flags & TCP_FLAG_FIN) ? 1 : 0);
	ri->l2 = p->l2_len;
	if (ri->l2 > ETH_HLEN + MAX_VLAN * sizeof(struct vlan_hdr))
		return -1;
	ri->is_v6 = p->is_v6;
	ri->len = ri->l2 + (p->is_v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) + sizeof(struct tcphdr);
	return 0;
}

// rst_write fills a frame already sized to ri->len; VLAN tags stay.
static __always_inline int rst_write(void *data, void *data_end, const struct rst_info *ri)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_source, ri->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, ri->smac, ETH_ALEN);

	void *l3p = data + ri->l2;
	struct tcphdr *tcp;
	__s64 sum;

	if (ri->is_v6) {
		struct ipv6hdr *ip6 = l3p;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			return -1;
		ip6->version = 6;
		ip6->priority = 0;
		__builtin_memset(ip6->flow_lbl, 0, sizeof(ip6->flow_lbl));
		ip6->payload_len = bpf_htons(sizeof(struct tcphdr));
		ip6->nexthdr = IPPROTO_TCP;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, ri->daddr, 16);
		__builtin_memcpy(&ip6->daddr, ri->saddr, 16);

		struct pseudo_v6 ph = {};
		__builtin_memcpy(ph.saddr, ri->daddr, 16);
		__builtin_memcpy(ph.daddr, ri->saddr, 16);
		ph.len = bpf_htonl(sizeof(struct tcphdr));
		ph.proto = IPPROTO_TCP;
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	} else {
		struct iphdr *ip = l3p;
		tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return -1;
		__be32 src4, dst4;
		__builtin_memcpy(&src4, ri->daddr + 12, 4);
		__builtin_memcpy(&dst4, ri->saddr + 12, 4);
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = 0;
		ip->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000); // DF
		ip->ttl = 64;
		ip->protocol = IPPROTO_TCP;
		ip->check = 0;
		ip->saddr = src4;
		ip->daddr = dst4;
		ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));

		struct pseudo_v4 ph = {
			.saddr = src4,
			.daddr = dst4,
			.proto = IPPROTO_TCP,
			.len = bpf_htons(sizeof(struct tcphdr)),
		};
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	}

	__builtin_memset(tcp, 0, sizeof(*tcp));
	tcp->source = ri->dport;
	tcp->dest = ri->sport;
	tcp->seq = 0;
	tcp->ack_seq = bpf_htonl(ri->ack);
	tcp->doff = 5;
	tcp->rst = 1;
	tcp->ack = 1;
	tcp->window = 0;
	sum = bpf_csum_diff(0, 0, (__be32 *)tcp, sizeof(*tcp), sum);
	tcp->check = csum_fold(sum);
	return 0;
}

// gate judges one parsed TCP packet; both entry points share it.
static __always_inline int gate(const struct frame *f, const struct pkt *p, struct gate_stats **stp)
{
	struct gate_policy *pol = bpf_map_lookup_elem(&policies, &p->key);
	if (!pol) {
		count(C_MISS);
		return V_PASS;
	}
	struct gate_stats *st = bpf_map_lookup_elem(&stats, &p->key);
	*stp = st;
	__u64 now = bpf_ktime_get_ns();
	__u32 state = *(volatile __u32 *)&pol->state;

	switch (state) {
	case GATE_OPEN:
		if (st) {
			st->packets++;
			st->bytes += f->len;
			st->last_seen_ns = now;
		}
		count(C_OPEN);
		if (is_udp(p))
			dgram_activity(p, now);
		else if (is_pure_syn(p)) {
			// Remember that this client got through on its own, so a
			// captured copy of its SYN is not replayed as well.
			struct flow_key fk;
			flow_of(&fk, p);
			struct syn_flow *seen = bpf_map_lookup_elem(&syn_flows, &fk);
			if (seen)
				seen->passed = 1;
		}
		return V_PASS;
	case GATE_PARKED:
		if (is_udp(p))
			return parked_dgram(f, p, pol, st, now);
		if (!is_pure_syn(p)) {
			count(C_PARKED_PASS);
			return V_PASS;
		}
		return parked_syn(f, p, pol, st, now);
	case GATE_MOVED:
		// A datagram goes to the stack, which answers "port unreachable":
		// UDP has no RST to tell the client to re-resolve.
		if (!is_pure_syn(p)) {
			count(C_MOVED_PASS);
			return V_PASS;
		}
		return V_RST;
	}
	return V_PASS;
}

static __always_inline int count_parse(int r)
{
	switch (r) {
	case PARSE_OK:
		return 1;
	case PARSE_NOT_TCP:
		count(C_NOT_TCP);
		break;
	case PARSE_FRAGMENT:
		count(C_FRAGMENT);
		break;
	default:
		count(C_MALFORMED);
	}
	return 0;
}

static __always_inline void rst_sent(struct gate_stats *st)
{
	if (st)
		st->rsts++;
	count(C_RST_SENT);
}

SEC("xdp")
int zs_gate(struct xdp_md *ctx)
{
	struct frame f = {
		.ctx = ctx,
		.data = (void *)(long)ctx->data,
		.data_end = (void *)(long)ctx->data_end,
		.ifindex = ctx->ingress_ifindex,
	};
	f.len = f.data_end - f.data;
	struct pkt p = {};

	count(C_PACKETS);
	if (!count_parse(parse(f.data, f.data_end, f.len, &p)))
		return XDP_PASS;

	struct gate_stats *st = 0;
	switch (gate(&f, &p, &st)) {
	case V_DROP:
		return XDP_DROP;
	case V_RST: {
		struct rst_info ri;
		if (rst_prepare(&f, &p, &ri))
			return XDP_PASS;
		int delta = (int)ri.len - (int)f.len;
		if (delta != 0 && bpf_xdp_adjust_tail(ctx, delta)) {
			count(C_RST_FAILED);
			return XDP_DROP;
		}
		if (rst_write((void *)(long)ctx->data, (void *)(long)ctx->data_end, &ri)) {
			count(C_RST_FAILED);
			return XDP_DROP;
		}
		rst_sent(st);
		return XDP_TX;
	}
	}
	return XDP_PASS;
}

#define TCX_NEXT -1
#define TC_ACT_SHOT 2

// zs_gate_tc is the same gate on tc ingress (tcx), for virtual devices:
// generic XDP copies every GRO-merged skb into one linear buffer, which
// costs a veth about a fifth of its throughput; tc sees the skb as it is.
// Passing returns TCX_NEXT so programs attached after this one still run.
SEC("tc")
int zs_gate_tc(struct __sk_buff *skb)
{
	struct frame f = {
		.ctx = skb,
		.data = (void *)(long)skb->data,
		.data_end = (void *)(long)skb->data_end,
		.len = skb->len,
		.ifindex = skb->ingress_ifindex,
		.is_tc = 1,
	};
	struct pkt p = {};

	count(C_PACKETS);
	int r = parse(f.data, f.data_end, f.len, &p);
	if (r == PARSE_MALFORMED && skb->len > (__u32)(f.data_end - f.data)) {
		// Headers may sit in fragments: pull them into the linear part.
		if (bpf_skb_pull_data(skb, skb->len < 256 ? skb->len : 256) == 0) {
			f.data = (void *)(long)skb->data;
			f.data_end = (void *)(long)skb->data_end;
			__builtin_memset(&p, 0, sizeof(p));
			r = parse(f.data, f.data_end, f.len, &p);
		}
	}
	if (!count_parse(r))
		return TCX_NEXT;

	struct gate_stats *st = 0;
	switch (gate(&f, &p, &st)) {
	case V_DROP:
		return TC_ACT_SHOT;
	case V_RST: {
		struct rst_info ri;
		if (rst_prepare(&f, &p, &ri))
			return TCX_NEXT;
		if (bpf_skb_change_tail(skb, ri.len, 0)) {
			count(C_RST_FAILED);
			return TC_ACT_SHOT;
		}
		if (rst_write((void *)(long)skb->data, (void *)(long)skb->data_end, &ri)) {
			count(C_RST_FAILED);
			return TC_ACT_SHOT;
		}
		// The checksums are complete now; a partial-checksum offload
		// state from the SYN must not be applied on top.
		bpf_csum_level(skb, BPF_CSUM_LEVEL_RESET);
		rst_sent(st);
		return bpf_redirect(skb->ifindex, 0);
	}
	}
	return TCX_NEXT;
}

/* ---------------------------------------------------------------- replay */

static __always_inline void set_replay_result(__u32 result)
{
	__u32 zero = 0;
	bpf_map_update_elem(&replay_result, &zero, &result, BPF_ANY);
}

// zs_replay lets a captured SYN into the stack only if a listener would take
// it; a missing listener means "too early, retry", an existing connection
// means the client's own retransmit already got through.
SEC("xdp")
int zs_replay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct pkt p = {};

	if (parse(data, data_end, data_end - data, &p) != PARSE_OK || (!is_pure_syn(&p) && !is_udp(&p))) {
		count(C_REPLAY_UNPARSEABLE);
		set_replay_result(REPLAY_UNPARSEABLE);
		return XDP_DROP;
	}

	// Behind a port mapping the listener sits in the allocation's namespace
	// at the mapped port; the frame itself still goes to the node address,
	// where the stack's NAT takes it there.
	__u8 *daddr = p.key.addr;
	__be16 dport = p.key.port;
	__u64 netns = BPF_F_CURRENT_NETNS;
	__u32 zero = 0;
	struct replay_target *target = bpf_map_lookup_elem(&replay_targets, &zero);
	if (target && target->set == REPLAY_FORWARD) {
		count(C_REPLAY_PASSED);
		set_replay_result(REPLAY_PASSED);
		return XDP_PASS;
	}
	if (target && target->set) {
		daddr = target->addr;
		dport = target->port;
		netns = (__u64)(__u32)target->netns_id;
	}

	struct bpf_sock_tuple tuple = {};
	__u32 size;
	if (p.is_v6) {
		__builtin_memcpy(tuple.ipv6.saddr, p.saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, daddr, 16);
		tuple.ipv6.sport = p.sport;
		tuple.ipv6.dport = dport;
		size = sizeof(tuple.ipv6);
	} else {
		__builtin_memcpy(&tuple.ipv4.saddr, p.saddr + 12, 4);
		__builtin_memcpy(&tuple.ipv4.daddr, daddr + 12, 4);
		tuple.ipv4.sport = p.sport;
		tuple.ipv4.dport = dport;
		size = sizeof(tuple.ipv4);
	}

	if (is_udp(&p)) {
		// A datagram needs a socket bound at its address and port.
		struct bpf_sock *usk = bpf_sk_lookup_udp(ctx, &tuple, size, netns, 0);
		if (!usk) {
			count(C_REPLAY_NO_LISTENER);
			set_replay_result(REPLAY_NO_LISTENER);
			return XDP_DROP;
		}
		bpf_sk_release(usk);
		count(C_REPLAY_PASSED);
		set_replay_result(REPLAY_PASSED);
		return XDP_PASS;
	}

	struct bpf_sock *sk = bpf_skc_lookup_tcp(ctx, &tuple, size, netns, 0);
	if (!sk) {
		count(C_REPLAY_NO_LISTENER);
		set_replay_result(REPLAY_NO_LISTENER);
		return XDP_DROP;
	}
	__u32 state = sk->state;
	bpf_sk_release(sk);
	if (state != ST_LISTEN) {
		count(C_REPLAY_CONNECTED);
		set_replay_result(REPLAY_CONNECTED);
		return XDP_DROP;
	}
	count(C_REPLAY_PASSED);
	set_replay_result(REPLAY_PASSED);
	return XDP_PASS;
}

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

// sock_owner reads, through the kernel's own type (tc has no
// bpf_sk_cgroup_id on this kernel), the cgroup v2 id of a socket's creator
// and the socket's inode, by which its process is found: on a node whose
// tasks live in cgroup v1 controllers, the v2 id names no allocation.
static __always_inline void sock_owner(struct bpf_sock *sk, struct probe_answer *answer)
{
	struct sock *ks = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct sock));
	struct cgroup *cg = ks->sk_cgrp_data.cgroup;
	if (cg)
		answer->cgroup_id = cg->kn->id;
	struct socket *so = ks->sk_socket;
	if (so && so->file && so->file->f_inode)
		answer->inode = so->file->f_inode->i_ino;
}

// zs_probe answers probe_queries: is a TCP listener or a bound UDP socket at
// the address, and in whose cgroup? UDP sockets have no listen transition
// for zs_sock_state to report, so a waking group's UDP readiness is asked.
// A tc program, for bpf_sk_cgroup_id; its packet is only a context.
SEC("tc")
int zs_probe(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct probe_answer answer = {};
	struct probe_query *q = bpf_map_lookup_elem(&probe_queries, &zero);
	if (!q)
		return TC_ACT_SHOT;

	__u64 netns = q->in_netns ? (__u64)(__u32)q->netns_id : BPF_F_CURRENT_NETNS;
	struct bpf_sock_tuple tuple = {};
	__u32 size;
	if (is_v4_mapped(q->addr)) {
		// The source is a placeholder: only a connected socket cares.
		__builtin_memcpy(&tuple.ipv4.saddr, q->addr + 12, 4);
		__builtin_memcpy(&tuple.ipv4.daddr, q->addr + 12, 4);
		tuple.ipv4.sport = bpf_htons(9);
		tuple.ipv4.dport = q->port;
		size = sizeof(tuple.ipv4);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, q->addr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, q->addr, 16);
		tuple.ipv6.sport = bpf_htons(9);
		tuple.ipv6.dport = q->port;
		size = sizeof(tuple.ipv6);
	}

	// Two lookups kept apart: the verifier will not let one instruction
	// read both a socket and a sock_common.
	if (q->proto == IPPROTO_UDP) {
		struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &tuple, size, netns, 0);
		if (sk) {
			answer.found = 1;
			answer.state = sk->state;
			sock_owner(sk, &answer);
			bpf_sk_release(sk);
		}
	} else {
		struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, size, netns, 0);
		if (sk) {
			__u32 state = sk->state;
			asm volatile("" : "+r"(state));
			answer.found = 1;
			answer.state = state;
			sock_owner(sk, &answer);
			bpf_sk_release(sk);
		}
	}
	bpf_map_update_elem(&probe_answers, &zero, &answer, BPF_ANY);
	return TC_ACT_SHOT;
}

/* ---------------------------------------------------------------- sockets */

static __always_inline void local_key(struct gate_key *k, const struct sock *sk, __u16 family)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (family == AF_INET6)
		BPF_CORE_READ_INTO(&k->addr, sk, __sk_common.skc_v6_rcv_saddr);
	else
		map_v4(k->addr, sk->__sk_common.skc_rcv_saddr);
	k->port = bpf_htons(sk->__sk_common.skc_num);
	k->proto = IPPROTO_TCP;
}

// remote_addr writes the peer's 16-byte address. (BPF_CORE_READ_INTO would
// copy sizeof(*addr), one byte, through this pointer.)
static __always_inline void remote_addr(__u8 *addr, const struct sock *sk, __u16 family)
{
	if (family == AF_INET6)
		bpf_core_read(addr, 16, &sk->__sk_common.skc_v6_daddr);
	else
		map_v4(addr, sk->__sk_common.skc_daddr);
}

// service_key names the service address a socket belongs to: its own local
// address in the node's namespace, or the node address that maps to its
// port in an allocation's namespace. It returns 0 for anything else.
static __always_inline int service_key(struct gate_key *k, const struct sock *sk, __u16 family, __u32 netns,
				       __u32 host_netns)
{
	if (!host_netns || netns == host_netns) {
		local_key(k, sk, family);
		return 1;
	}
	struct ns_port np = {.netns = netns, .port = bpf_htons(sk->__sk_common.skc_num)};
	struct gate_key *mapped = bpf_map_lookup_elem(&ns_ports, &np);
	if (!mapped)
		return 0;
	*k = *mapped;
	k->proto = IPPROTO_TCP; // a port maps for both protocols
	return 1;
}

static __always_inline void listen_event(const struct sock *sk, __u16 family, __u32 netns)
{
	__u16 port = sk->__sk_common.skc_num;
	if (!bpf_map_lookup_elem(&listen_ports, &port))
		return;
	struct event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev) {
		count(C_RINGBUF_FULL);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->kind = EVENT_LISTEN;
	ev->ts_ns = bpf_ktime_get_ns();
	local_key(&ev->key, sk, family);
	// listen() runs in the listening process, so "current" is the owner:
	// the agent maps its cgroup to an allocation and opens the gate only
	// for the woken allocation's listener.
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->tgid = bpf_get_current_pid_tgid() >> 32;
	ev->netns = netns;
	bpf_ringbuf_submit(ev, 0);
	count(C_LISTEN_EVENTS);
}

// A connection is a health check when a checker process (the local Consul or
// Nomad agent) opened it, or its peer is in ignore_sources. The checker's end
// is looked up in the server's namespace (a checker there, or on the node
// itself) and then in the node's: a check through a port mapping arrives
// from the node with its source address and port as they were.
static __always_inline int is_check(const struct sock *sk, __u16 family, __u32 netns, __u32 host_netns)
{
	struct lpm_key lk = {.prefixlen = 128};
	remote_addr(lk.addr, sk, family);
	if (bpf_map_lookup_elem(&ignore_sources, &lk))
		return 1;

	struct checker_peer cp = {.netns = netns, .port = sk->__sk_common.skc_dport};
	__builtin_memcpy(cp.addr, lk.addr, 16);
	if (bpf_map_lookup_elem(&checker_peers, &cp)) {
		bpf_map_delete_elem(&checker_peers, &cp);
		return 1;
	}
	if (!host_netns || netns == host_netns)
		return 0;
	cp.netns = host_netns;
	if (bpf_map_lookup_elem(&checker_peers, &cp)) {
		bpf_map_delete_elem(&checker_peers, &cp);
		return 1;
	}
	return 0;
}

static __always_inline void passive_established(const struct sock *sk, __u16 family, __u32 netns, __u32 host_netns)
{
	struct gate_key k;
	if (!service_key(&k, sk, family, netns, host_netns))
		return;
	struct sock_activity *a = bpf_map_lookup_elem(&activity, &k);
	if (!a)
		return;
	__u64 now = bpf_ktime_get_ns();
	if (is_check(sk, family, netns, host_netns)) {
		__sync_fetch_and_add(&a->checks, 1);
		a->last_check_ns = now;
		count(C_CHECK_CONNS);
		return;
	}
	__u64 skp = (__u64)sk;
	if (bpf_map_update_elem(&counted_socks, &skp, &k, BPF_NOEXIST) != 0)
		return;
	__sync_fetch_and_add(&a->established, 1);
	__sync_fetch_and_add(&a->opened, 1);
	a->last_active_ns = now;
	count(C_COUNTED_CONNS);
}

static __always_inline void left_established(struct sock *sk)
{
	__u64 skp = (__u64)sk;
	struct gate_key *kp = bpf_map_lookup_elem(&counted_socks, &skp);
	if (!kp)
		return;
	struct gate_key k = *kp;
	if (bpf_map_delete_elem(&counted_socks, &skp) != 0)
		return;
	struct sock_activity *a = bpf_map_lookup_elem(&activity, &k);
	if (!a)
		return;
	__sync_fetch_and_add(&a->established, -1);
	__sync_fetch_and_add(&a->closed, 1);
	a->last_active_ns = bpf_ktime_get_ns();
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (tp)
		__sync_fetch_and_add(&a->bytes, tp->bytes_received + tp->bytes_acked);
}

// The CLOSE→SYN_SENT transition runs in the connecting process, so its comm
// tells whether a checker opened the socket; its ports are known only once
// it is connected, when the flow is recorded for the server side to find.
static __always_inline void active_open(struct sock *sk)
{
	char comm[16] = {};
	bpf_get_current_comm(comm, sizeof(comm));
	if (!bpf_map_lookup_elem(&checker_comms, comm))
		return;
	__u64 skp = (__u64)sk;
	__u8 one = 1;
	bpf_map_update_elem(&checker_socks, &skp, &one, BPF_ANY);
}

static __always_inline void active_established(struct sock *sk, __u16 family, __u32 netns)
{
	__u64 skp = (__u64)sk;
	if (!bpf_map_lookup_elem(&checker_socks, &skp))
		return;
	bpf_map_delete_elem(&checker_socks, &skp);

	struct checker_peer cp = {.netns = netns, .port = bpf_htons(sk->__sk_common.skc_num)};
	if (family == AF_INET6)
		bpf_core_read(cp.addr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
	else
		map_v4(cp.addr, sk->__sk_common.skc_rcv_saddr);
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&checker_peers, &cp, &now, BPF_ANY);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(zs_sock_state, struct sock *sk, int oldstate, int newstate)
{
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	struct gate_config *cfg = get_config();
	if (!cfg)
		return 0;
	// Every namespace: services behind a port mapping live in their
	// allocation's own, and checks may run there too.
	__u32 netns = sk->__sk_common.skc_net.net->ns.inum;
	__u32 host_netns = cfg->netns_inum;
	__u16 family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;

	if (newstate == ST_LISTEN) {
		listen_event(sk, family, netns);
	} else if (oldstate == ST_CLOSE && newstate == ST_SYN_SENT) {
		active_open(sk);
	} else if (oldstate == ST_SYN_SENT) {
		if (newstate == ST_ESTABLISHED)
			active_established(sk, family, netns);
		else {
			__u64 skp = (__u64)sk;
			bpf_map_delete_elem(&checker_socks, &skp);
		}
	} else if (newstate == ST_ESTABLISHED) {
		passive_established(sk, family, netns, host_netns);
	} else if (oldstate == ST_ESTABLISHED) {
		left_established(sk);
	}
	return 0;
}

// zs_udp_recv counts datagrams read by a UDP service behind a port mapping
// as that service address's activity. The gate on the node's interfaces
// sees the datagrams that arrive from outside (and honours ignore_sources);
// a client on the node reaches such a service through the port mapping's
// own NAT, past the gate, so only the socket sees those.
SEC("tp_btf/sock_recv_length")
int BPF_PROG(zs_udp_recv, struct sock *sk, int ret, int flags)
{
	if (ret <= 0 || sk->sk_protocol != IPPROTO_UDP)
		return 0;
	struct gate_config *cfg = get_config();
	if (!cfg || !cfg->netns_inum)
		return 0;
	__u32 netns = sk->__sk_common.skc_net.net->ns.inum;
	if (netns == cfg->netns_inum)
		return 0;
	struct ns_port np = {.netns = netns, .port = bpf_htons(sk->__sk_common.skc_num)};
	struct gate_key *mapped = bpf_map_lookup_elem(&ns_ports, &np);
	if (!mapped)
		return 0;
	struct gate_key k = *mapped;
	k.proto = IPPROTO_UDP;
	struct sock_activity *a = bpf_map_lookup_elem(&activity, &k);
	if (!a)
		return 0;
	a->last_active_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&a->bytes, ret);
	count(C_DGRAM_NS_ACTIVITY);
	return 0;
}
