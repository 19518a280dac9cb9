"""What only a storage node runs: the daemon that assembles a node, the service that
executes data-plane operations on its store (for the network and, in process, for its own
gateways), recovery, repair and the scrub. Clients never import this package."""
