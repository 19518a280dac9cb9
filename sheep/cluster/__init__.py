"""Cluster: ring, membership, epochs; coordination in etcd."""
