"""Command-line front ends: `sheep` (daemon, embedded cluster) and `dog` (admin)."""
