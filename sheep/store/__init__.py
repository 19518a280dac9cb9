"""Object store of one node: sparse object files plus LMDB node metadata."""

from sheep.store.meta import NodeMeta
from sheep.store.objstore import ObjectStore

__all__ = ["NodeMeta", "ObjectStore"]
