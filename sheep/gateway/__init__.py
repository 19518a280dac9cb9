"""Protocol gateways (NBD, iSCSI): thin layers that expose VDIs to unmodified clients."""
