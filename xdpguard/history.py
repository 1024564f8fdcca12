"""Copies of applied policies, for `rollback` further back than the policy
the program still holds.

The pinned record names the policies applied before the running one,
newest first (pins.Record.history). `rollback` to the first of them flips
to the other generation or swaps the @prev pins back when that is where it
still is (loader), and otherwise compiles it again from the copy kept
here: the policy file and its set files have usually been edited since,
which is why one rolls back. Under the interface's state directory
(bans.state_dir):

    history/<policy sha256>.json    {"source", "name", "policy": blob, "sets": {"file string": blob}}
    history/blobs/<sha256>          file contents, each once: a blocklist
                                    several policies read is kept once

Written under the pin lock, before the record that names the policy; kept
while the running record or its history names it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xdpguard import bans, pins
from xdpguard.errors import UsageError
from xdpguard.policy import Policy, load


def history_dir(netns: str | None, iface: str) -> Path:
    return bans.state_dir(netns or "host", iface) / "history"


def _put_blob(blobs: Path, src, want: str) -> bool:
    """Copy a file (path) or bytes into blobs/<want>, fsynced; False when
    its contents are not that sha256 (the file changed since it was read)."""
    target = blobs / want
    if target.exists():
        return True
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".blob.")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            if isinstance(src, bytes):
                h.update(src)
                out.write(src)
            else:
                with open(src, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != want:
            return False
        os.replace(tmp, target)
        tmp = None
        return True
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save(policy: Policy, netns: str | None, iface: str) -> str | None:
    """Keep a copy of the policy and its set files; a warning (the policy
    then cannot be rolled back to once the program no longer holds it),
    or None. Hold the pin lock."""
    d = history_dir(netns, iface)
    manifest = d / f"{policy.sha256}.json"
    if manifest.exists():
        return None
    try:
        blobs = d / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        text = hashlib.sha256(policy.text).hexdigest()
        _put_blob(blobs, policy.text, text)
        sets = {}
        for name, (path, sha) in policy.inputs.items():
            if not _put_blob(blobs, path, sha):
                return (f"set file {path} changed since it was read: policy '{policy.name}' "
                        f"is not kept for a later rollback")
            sets[name] = sha
        bans.write_json_atomic(manifest, {"source": policy.source, "name": policy.name,
                                          "policy": text, "sets": sets})
    except OSError as e:
        return f"policy '{policy.name}' is not kept for a later rollback: {e}"
    return None


@dataclass
class Kept:
    """A kept copy of a policy: its file's text and where it was read,
    and the kept copy of each set file by its "file" string."""
    source: str
    name: str
    text: str
    sets: dict[str, Path]


def read_kept(netns: str | None, iface: str, info: pins.PolicyInfo) -> Kept:
    """The kept copy a record or history entry names, unparsed (UsageError
    when none was kept)."""
    d = history_dir(netns, iface)
    doc = bans.read_json(d / f"{info.sha256}.json", None)
    missing = _missing(d, iface, info)
    if not isinstance(doc, dict):
        raise missing
    try:
        blobs = d / "blobs"
        return Kept(doc["source"], doc["name"], (blobs / doc["policy"]).read_bytes().decode("utf-8"),
                    {name: blobs / sha for name, sha in doc["sets"].items()})
    except (OSError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise missing from None


def load_kept(netns: str | None, iface: str, info: pins.PolicyInfo) -> Policy:
    """The policy a history entry names, from its copy (UsageError when
    none was kept)."""
    kept = read_kept(netns, iface, info)
    try:
        policy = load(kept.source, text=kept.text, set_files={k: str(v) for k, v in kept.sets.items()})
    except OSError:
        policy = None
    if policy is None or policy.sha256 != info.sha256:
        raise _missing(history_dir(netns, iface), iface, info)
    return policy


def _missing(d: Path, iface: str, info: pins.PolicyInfo) -> UsageError:
    return UsageError(f"{iface}: no copy of policy '{info.name}' (sha256 {info.sha256[:16]}...) "
                      f"is kept in {d}; apply it again from its file")


def prune(netns: str | None, iface: str, record: pins.Record) -> None:
    """Remove the copies neither the record nor its history names."""
    d = history_dir(netns, iface)
    if not d.is_dir():
        return
    keep = {record.policy.sha256} | {p.sha256 for p in record.history}
    used = set()
    for m in d.glob("*.json"):
        doc = bans.read_json(m, None)
        if m.stem not in keep or not isinstance(doc, dict):
            m.unlink(missing_ok=True)
            continue
        used.add(doc.get("policy"))
        used.update((doc.get("sets") or {}).values())
    for b in (d / "blobs").glob("*"):
        if b.name not in used:
            if b.is_dir():
                shutil.rmtree(b, ignore_errors=True)
            else:
                b.unlink(missing_ok=True)
