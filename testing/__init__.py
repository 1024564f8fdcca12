"""Test tooling shared by tests/, bench/ and scripts/demo.sh: the namespace
and veth lab (lab), deadlines stretched to the machine (timing), random
frames for fuzzing (fuzzgen), where the blocklist data lies
(blocklists) and the web-and-mitigation policy of the mitigation tests
and bench (webpolicy). Not part of the product: the xdpguard package
never imports it, and it is not installed.
"""
