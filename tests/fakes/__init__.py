"""In-memory stand-ins for what the cluster's classes run against (etcd, the clock), so
unit tests check their rules without processes or sleeps. Each fake's contract against the
real thing is pinned by tests/integration/test_kv_contract.py."""
