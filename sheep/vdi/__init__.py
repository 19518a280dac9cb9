"""Virtual disk images on the replicated object store: inodes, registry, volumes."""
