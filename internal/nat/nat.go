// Package nat forwards TCP connections from one address:port to another with
// the kernel's own NAT (nftables), so that a service which woke up somewhere
// else is still reached at the address its clients know. The rules live in
// the kernel and are read back from it: a restarted agent finds the forwards
// of the previous one, and conntrack keeps forwarded connections going after
// a forward is removed.
package nat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Chain names inside the agent's table.
const (
	preroutingChain  = "prerouting"
	outputChain      = "output"
	postroutingChain = "postrouting"
)

// commentPrefix starts the comment of every rule of a forward; the comment
// ("zeroscale-forward A:pA B:pB") is the forward's identity in the kernel.
const commentPrefix = "zeroscale-forward"

// ctDirOriginal is IP_CT_DIR_ORIGINAL: the client's direction of a
// connection, whose destination is the one before DNAT.
const ctDirOriginal = 0

// Table is the agent's own nftables table (family inet, so IPv4 and IPv6
// alike), named at Open.
type Table struct {
	mu          sync.Mutex // one read-modify-write of the rules at a time
	conn        *nftables.Conn
	dumpConn    *netlink.Conn // reads rules back; see listRules
	table       *nftables.Table
	prerouting  *nftables.Chain
	output      *nftables.Chain
	postrouting *nftables.Chain
}

// Forward is one forward as the kernel holds it.
type Forward struct {
	To netip.AddrPort
	// Connections is the number of new connections forwarded so far: the
	// counters of the prerouting and output DNAT rules (a nat chain sees only
	// the first packet of each connection).
	Connections uint64
}

// Open creates the table `name` with its three NAT base chains, or takes
// over an existing one without touching its rules, so that forwards made
// before a restart keep working and are found again.
func Open(name string) (*Table, error) {
	if name == "" {
		return nil, errors.New("open the nat table: empty name")
	}
	// Lasting sockets stay in the network namespace Open was called in,
	// whichever thread later uses them.
	conn, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("open the nftables netlink socket: %w", err)
	}
	dumpConn, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		_ = conn.CloseLasting()
		return nil, fmt.Errorf("open the netfilter netlink socket: %w", err)
	}
	t := &Table{conn: conn, dumpConn: dumpConn, table: &nftables.Table{Name: name, Family: nftables.TableFamilyINet}}
	natChain := func(name string, hook *nftables.ChainHook, priority *nftables.ChainPriority) *nftables.Chain {
		return &nftables.Chain{Name: name, Table: t.table, Type: nftables.ChainTypeNAT, Hooknum: hook, Priority: priority}
	}
	t.prerouting = natChain(preroutingChain, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
	t.output = natChain(outputChain, nftables.ChainHookOutput, nftables.ChainPriorityNATDest)
	t.postrouting = natChain(postroutingChain, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)

	// NLM_F_CREATE without NLM_F_EXCL: an existing table or chain is kept
	// as it is, rules included.
	conn.AddTable(t.table)
	conn.AddChain(t.prerouting)
	conn.AddChain(t.output)
	conn.AddChain(t.postrouting)
	if err := conn.Flush(); err != nil {
		_ = t.Close()
		return nil, fmt.Errorf("create the nat table %s: %w", name, err)
	}
	return t, nil
}

// Forward makes new TCP connections to from go to `to`. It is idempotent,
// and replaces an existing forward of from whose target differs, in one
// transaction (its Connections count starts again from 0).
func (t *Table) Forward(from, to netip.AddrPort) error {
	if err := checkForward(from, to); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	rules, err := t.forwardRules()
	if err != nil {
		return err
	}
	existing := rules[from]
	if isComplete(existing, to) {
		return nil
	}
	for _, r := range existing {
		if err := t.deleteRule(r); err != nil {
			return fmt.Errorf("delete the old forward of %s: %w", from, err)
		}
	}
	comment := userdata.AppendString(nil, userdata.TypeComment, forwardComment(from, to))
	for _, chain := range []*nftables.Chain{t.prerouting, t.output} {
		t.conn.AddRule(&nftables.Rule{Table: t.table, Chain: chain, Exprs: dnatExprs(from, to), UserData: comment})
	}
	t.conn.AddRule(&nftables.Rule{Table: t.table, Chain: t.postrouting, Exprs: masqueradeExprs(from), UserData: comment})
	if err := t.conn.Flush(); err != nil {
		return fmt.Errorf("add the forward %s -> %s: %w", from, to, err)
	}
	return nil
}

// Unforward removes the forward of from; connections already forwarded keep
// going through conntrack. Removing an absent forward is not an error.
func (t *Table) Unforward(from netip.AddrPort) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	rules, err := t.forwardRules()
	if err != nil {
		return err
	}
	if len(rules[from]) == 0 {
		return nil
	}
	for _, r := range rules[from] {
		if err := t.deleteRule(r); err != nil {
			return fmt.Errorf("delete the forward of %s: %w", from, err)
		}
	}
	if err := t.conn.Flush(); err != nil {
		return fmt.Errorf("delete the forward of %s: %w", from, err)
	}
	return nil
}

// Forwards reads the forwards back from the kernel, keyed by the address
// they forward from.
func (t *Table) Forwards() (map[netip.AddrPort]Forward, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	rules, err := t.forwardRules()
	if err != nil {
		return nil, err
	}
	forwards := make(map[netip.AddrPort]Forward, len(rules))
	for from, rs := range rules {
		var f Forward
		for _, r := range rs {
			f.To = r.to
			if r.chain != t.postrouting {
				f.Connections += r.packets
			}
		}
		forwards[from] = f
	}
	return forwards, nil
}

// Delete removes the whole table, forwards included (uninstall). A table
// that is already gone is not an error.
func (t *Table) Delete() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.conn.DelTable(t.table)
	if err := t.conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete the nat table %s: %w", t.table.Name, err)
	}
	return nil
}

// Close releases the netlink sockets; the table and its rules stay.
func (t *Table) Close() error {
	return errors.Join(t.conn.CloseLasting(), t.dumpConn.Close())
}

// EnableForwarding turns on IPv4 (family4) or IPv6 forwarding, which
// forwards to another host need, and says whether it was off. Enabling IPv6
// forwarding for all interfaces also stops them from accepting router
// advertisements unless accept_ra is 2.
func EnableForwarding(family4 bool) (changed bool, err error) {
	path := "/proc/sys/net/ipv6/conf/all/forwarding"
	if family4 {
		path = "/proc/sys/net/ipv4/ip_forward"
	}
	current, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	if strings.TrimSpace(string(current)) != "0" {
		return false, nil
	}
	if err := os.WriteFile(path, []byte("1\n"), 0o644); err != nil {
		return false, fmt.Errorf("enable forwarding in %s: %w", path, err)
	}
	return true, nil
}

// forwardRule is one rule of a forward, as found in the kernel.
type forwardRule struct {
	chain   *nftables.Chain
	handle  uint64
	to      netip.AddrPort
	packets uint64 // of its counter
}

// forwardRules reads the rules of every forward, keyed by the address they
// forward from. Rules without our comment are someone else's and left out.
func (t *Table) forwardRules() (map[netip.AddrPort][]forwardRule, error) {
	rules := make(map[netip.AddrPort][]forwardRule)
	for _, chain := range []*nftables.Chain{t.prerouting, t.output, t.postrouting} {
		listed, err := t.listRules(chain.Name)
		if err != nil {
			return nil, fmt.Errorf("list the rules of %s/%s: %w", t.table.Name, chain.Name, err)
		}
		for _, r := range listed {
			from, to, ok := parseForwardComment(r.comment)
			if !ok {
				continue
			}
			rules[from] = append(rules[from], forwardRule{chain: chain, handle: r.handle, to: to, packets: r.packets})
		}
	}
	return rules, nil
}

func (t *Table) deleteRule(r forwardRule) error {
	return t.conn.DelRule(&nftables.Rule{Table: t.table, Chain: r.chain, Handle: r.handle})
}

// listedRule is what forwards need of a rule: its handle, to delete it, its
// comment, which names the forward, and its counter.
type listedRule struct {
	handle  uint64
	comment string
	packets uint64
}

// listRules dumps the rules of one chain. It decodes the netlink messages
// itself rather than through Conn.GetRules, which in v0.3.0 of the library
// fails the whole dump on the ct direction of the masquerade rules (the
// kernel sends it as a u8, the library reads a u32).
func (t *Table) listRules(chain string) ([]listedRule, error) {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: []byte(t.table.Name + "\x00")},
		{Type: unix.NFTA_RULE_CHAIN, Data: []byte(chain + "\x00")},
	})
	if err != nil {
		return nil, err
	}
	request := netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE),
			Flags: netlink.Request | netlink.Dump,
		},
		// struct nfgenmsg: family, version, resource id.
		Data: append([]byte{byte(t.table.Family), unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
	replies, err := t.dumpConn.Execute(request)
	if err != nil {
		return nil, err
	}
	rules := make([]listedRule, 0, len(replies))
	for _, reply := range replies {
		r, err := decodeRule(reply.Data)
		if err != nil {
			return nil, fmt.Errorf("decode a rule: %w", err)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// decodeRule reads a NFT_MSG_NEWRULE message, skipping the expressions
// other than counters.
func decodeRule(data []byte) (listedRule, error) {
	var r listedRule
	if len(data) < 4 {
		return r, errors.New("message shorter than its nfgenmsg header")
	}
	rule, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return r, err
	}
	rule.ByteOrder = binary.BigEndian
	for rule.Next() {
		switch rule.Type() {
		case unix.NFTA_RULE_HANDLE:
			r.handle = rule.Uint64()
		case unix.NFTA_RULE_USERDATA:
			r.comment, _ = userdata.GetString(rule.Bytes(), userdata.TypeComment)
		case unix.NFTA_RULE_EXPRESSIONS:
			rule.Nested(func(list *netlink.AttributeDecoder) error {
				for list.Next() {
					list.Nested(func(e *netlink.AttributeDecoder) error {
						packets, err := counterPackets(e)
						r.packets += packets
						return err
					})
				}
				return nil
			})
		}
	}
	return r, rule.Err()
}

// counterPackets is the packet count of an expression if it is a counter,
// and 0 otherwise.
func counterPackets(e *netlink.AttributeDecoder) (uint64, error) {
	var name string
	var data []byte
	for e.Next() {
		switch e.Type() {
		case unix.NFTA_EXPR_NAME:
			name = e.String()
		case unix.NFTA_EXPR_DATA:
			data = e.Bytes()
		}
	}
	if name != "counter" {
		return 0, nil
	}
	var counter expr.Counter
	if err := expr.Unmarshal(byte(nftables.TableFamilyINet), data, &counter); err != nil {
		return 0, err
	}
	return counter.Packets, nil
}

// isComplete says whether a forward's rules are exactly one per chain, all
// to `to`; anything else (another target, a rule deleted by hand) is redone.
func isComplete(rules []forwardRule, to netip.AddrPort) bool {
	perChain := map[string]int{}
	for _, r := range rules {
		if r.to != to {
			return false
		}
		perChain[r.chain.Name]++
	}
	return len(rules) == 3 && perChain[preroutingChain] == 1 && perChain[outputChain] == 1 && perChain[postroutingChain] == 1
}

func checkForward(from, to netip.AddrPort) error {
	for _, ap := range []netip.AddrPort{from, to} {
		switch {
		case !ap.IsValid() || ap.Port() == 0:
			return fmt.Errorf("forward %s -> %s: %s is not an address and port", from, to, ap)
		case ap.Addr().Zone() != "":
			return fmt.Errorf("forward %s -> %s: %s has a zone, which NAT cannot match", from, to, ap)
		case ap.Addr().Is4In6():
			// Forwards() would key it by what the kernel matches (IPv4),
			// not by what the caller asked for.
			return fmt.Errorf("forward %s -> %s: %s is IPv4-mapped; use its IPv4 form", from, to, ap)
		}
	}
	if from.Addr().Is4() != to.Addr().Is4() {
		return fmt.Errorf("forward %s -> %s: mixed address families", from, to)
	}
	return nil
}

func forwardComment(from, to netip.AddrPort) string {
	return commentPrefix + " " + from.String() + " " + to.String()
}

func parseForwardComment(comment string) (from, to netip.AddrPort, ok bool) {
	fields := strings.Fields(comment)
	if len(fields) != 3 || fields[0] != commentPrefix {
		return from, to, false
	}
	from, errFrom := netip.ParseAddrPort(fields[1])
	to, errTo := netip.ParseAddrPort(fields[2])
	return from, to, errFrom == nil && errTo == nil
}

// nfproto is the layer 3 protocol of addr, as meta nfproto and nat name it.
func nfproto(addr netip.Addr) byte {
	if addr.Is4() {
		return unix.NFPROTO_IPV4
	}
	return unix.NFPROTO_IPV6
}

// matchTCPTo selects TCP packets addressed to dst: meta nfproto, meta
// l4proto tcp, ip(6) daddr, tcp dport. The inet family needs the nfproto
// check, else an IPv6 header would be read at IPv4 offsets.
func matchTCPTo(dst netip.AddrPort) []expr.Any {
	daddrOffset := uint32(16) // in the IPv4 header
	if dst.Addr().Is6() {
		daddrOffset = 24 // in the IPv6 header
	}
	addr := dst.Addr().AsSlice()
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto(dst.Addr())}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOffset, Len: uint32(len(addr))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, dst.Port())},
	}
}

// dnatExprs is `<match from> counter dnat to <to>`.
func dnatExprs(from, to netip.AddrPort) []expr.Any {
	return append(matchTCPTo(from),
		&expr.Counter{},
		&expr.Immediate{Register: 1, Data: to.Addr().AsSlice()},
		&expr.Immediate{Register: 2, Data: binary.BigEndian.AppendUint16(nil, to.Port())},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(nfproto(to.Addr())), RegAddrMin: 1, RegProtoMin: 2},
	)
}

// masqueradeExprs masquerades the forwarded connections of from that leave
// the host, so that the target answers through us and conntrack can undo
// the DNAT: `ct original daddr <from addr> ct original proto-dst <from port>
// meta oiftype != loopback masquerade`.
func masqueradeExprs(from netip.AddrPort) []expr.Any {
	addr := from.Addr().AsSlice()
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto(from.Addr())}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		// In an inet table ct daddr fills a 16-byte register, of which an
		// IPv4 address takes the first 4: compare just those. (The 4-byte
		// key NFT_CT_DST_IP needs a direction, which library v0.3.0 only
		// sends for NFT_CT_DST.) The library sends the direction as a u32
		// where the kernel wants a u8: the kernel reads its first byte, 0
		// as meant, and logs "attribute type 3 has an invalid length".
		&expr.Ct{Key: expr.CtKeyDST, Direction: ctDirOriginal, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr},
		&expr.Ct{Key: expr.CtKeyPROTODST, Direction: ctDirOriginal, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, from.Port())},
		// A local client forwarded to a local port leaves through lo, and
		// masquerading there would swap its address for any other of the
		// host's.
		&expr.Meta{Key: expr.MetaKeyOIFTYPE, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binary.NativeEndian.AppendUint16(nil, unix.ARPHRD_LOOPBACK)},
		&expr.Masq{},
	}
}
