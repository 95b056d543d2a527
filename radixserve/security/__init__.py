"""Security tooling: the prefix-cache isolation audit (audit.py) and its statistics (ks.py)."""
