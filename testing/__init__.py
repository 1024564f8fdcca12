"""Test tooling shared by tests/, bench/ and scripts/demo.sh: the namespace
and veth lab (lab), deadlines stretched to the machine (timing), random
frames for fuzzing (fuzzgen) and where the blocklist data lies
(blocklists). Not part of the product: the xdpguard package never imports
it, and it is not installed.
"""
