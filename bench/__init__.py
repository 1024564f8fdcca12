"""xdpguard benchmark suite (bench/run.py)."""
