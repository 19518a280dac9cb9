"""VM runtime: boots QEMU guests with sheep VDIs as virtio disks (see issue 8)."""
