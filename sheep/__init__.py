"""sheep: a distributed block store in the line of Sheepdog and Ceph RBD."""

__version__ = "0.1.0"
