"""Data plane: the framed binary protocol between gateways and storage nodes."""
