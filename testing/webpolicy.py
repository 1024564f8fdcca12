"""The policy the mitigation tests and benchmarks share: TCP port 80 allowed,
mitigation on; each caller sets only the mitigation keys it is about."""
from __future__ import annotations

import json


def web_policy(name: str, rules: str = "", **mitigation) -> str:
    """TOML text of policy `name`: the `rules` ([[rule]] tables) first, then
    an allow rule for TCP port 80, then [mitigation] enabled with the given
    keys (str, int, bool or a list of str)."""
    # JSON's strings, numbers, booleans and arrays of these are TOML values too.
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in {"enabled": True, **mitigation}.items())
    return (f'[policy]\nname = "{name}"\n{rules}'
            '[[rule]]\nname = "web"\nproto = "tcp"\ndport = 80\naction = "allow"\n'
            f"[mitigation]\n{keys}")
