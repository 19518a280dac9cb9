"""Who may talk to a sheep cluster: its CA and certificates (pki), a process's identity on
each transport (identity), and where dog finds its own (config)."""
