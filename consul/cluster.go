package consul

// Cluster bundles what the scaler needs from Consul: the KV records, the
// placeholders and the election.
type Cluster struct {
	*Client
	Placeholders *Placeholders
	Leader       *Leader
	Node         string
}

// NodeName is this node's Consul name.
func (c *Cluster) NodeName() string { return c.Node }

// IsLeader tells whether this node decides scale-downs.
func (c *Cluster) IsLeader() bool { return c.Leader != nil && c.Leader.IsLeader() }

// RegisterPlaceholder registers and keeps a stand-in alive.
func (c *Cluster) RegisterPlaceholder(p Placeholder) error { return c.Placeholders.Register(p) }

// DeregisterPlaceholder removes a stand-in.
func (c *Cluster) DeregisterPlaceholder(p Placeholder) error { return c.Placeholders.Deregister(p) }
