"""xdpguard.bpfsys (libbpf via ctypes) and xdpguard.netns against the kernel.

Needs root, bcc and bpffs. Every interface touched here is a veth pair
created inside a fresh network namespace by a fixture that removes it
again; nothing is attached to or sent through the host's interfaces.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF"),
]

from conftest import skip_refused  # noqa: E402
from xdpguard import bpfsys as bs  # noqa: E402
from xdpguard import netns as xns  # noqa: E402
from testing.lab import VethPair, unique  # noqa: E402

BPFFS = "/sys/fs/bpf"

PROGRAMS = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>

BPF_HASH(h, u32, u64, 64);
BPF_ARRAY(counter, u64, 1);
BPF_ARRAY(ctxrec, u32, 3);

/* Drop IPv4 UDP, pass everything else. */
int xdp_udp_drop(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    if (eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return XDP_PASS;
    return ip->protocol == IPPROTO_UDP ? XDP_DROP : XDP_PASS;
}

int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }

int xdp_tx(struct xdp_md *ctx) { return XDP_TX; }

/* Count frames of the test ethertype (not the kernel's own IPv6 chatter
 * on a fresh link), then drop everything. */
int xdp_count_drop(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != htons(0x88B5))
        return XDP_DROP;
    u32 k = 0;
    u64 *v = counter.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return XDP_DROP;
}

/* Record what the context says about the receiving device. */
int xdp_ctx(struct xdp_md *ctx)
{
    u32 k0 = 0, k1 = 1, k2 = 2;
    u32 ifindex = ctx->ingress_ifindex, q = ctx->rx_queue_index;
    u32 linear = ctx->data_end - ctx->data;
    ctxrec.update(&k0, &ifindex);
    ctxrec.update(&k1, &q);
    ctxrec.update(&k2, &linear);
    return XDP_PASS;
}

/* Grow the frame by 4 bytes at the front. */
int xdp_push4(struct xdp_md *ctx)
{
    if (bpf_xdp_adjust_head(ctx, -4))
        return XDP_ABORTED;
    return XDP_PASS;
}
"""

U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")


# ---- frames -----------------------------------------------------------------

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def eth(proto: int, payload: bytes, dst: bytes = MAC_B, src: bytes = MAC_A) -> bytes:
    return dst + src + struct.pack("!H", proto) + payload


def ipv4(proto: int, l4: bytes) -> bytes:
    # 192.0.2.0/24 and 198.51.100.0/24: documentation ranges; these frames
    # only ever go into BPF_PROG_TEST_RUN.
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
        bytes([192, 0, 2, 1]), bytes([198, 51, 100, 1]),
    )
    return hdr + l4


def udp_frame(sport: int = 1234, dport: int = 53) -> bytes:
    return eth(0x0800, ipv4(17, struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"abcd"))


def tcp_frame(sport: int = 1234, dport: int = 80) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    return eth(0x0800, ipv4(6, tcp))


def arp_frame() -> bytes:
    return eth(0x0806, bytes(28))


# ---- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bpf():
    from bcc import BPF

    b = BPF(text=PROGRAMS)
    progs = {
        name: b.load_func(name, BPF.XDP)
        for name in ("xdp_udp_drop", "xdp_pass", "xdp_tx", "xdp_count_drop", "xdp_ctx", "xdp_push4")
    }
    yield SimpleNamespace(b=b, **{k: v.fd for k, v in progs.items()})
    b.cleanup()


def _thread_netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _netns_ino(name: str) -> int:
    return os.stat(xns.netns_path(name)).st_ino


@pytest.fixture
def vethns():
    """A fresh namespace holding an up veth pair (a <-> b) with the MACs of
    the test frames; removed after."""
    with VethPair("xgt", split=False) as v:
        v.ip(v.name, f"link set {v.a} address {MAC_A.hex(':')}", f"link set {v.b} address {MAC_B.hex(':')}")
        yield v


@pytest.fixture
def pindir():
    path = os.path.join(BPFFS, unique("xgt", 11))
    os.mkdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path)  # unlinking a pin drops only the pin's reference


# ---- prog_test_run ----------------------------------------------------------


def test_verdicts(bpf):
    assert bs.prog_test_run(bpf.xdp_udp_drop, udp_frame())[0] == bs.XDP_DROP
    assert bs.prog_test_run(bpf.xdp_udp_drop, tcp_frame())[0] == bs.XDP_PASS
    assert bs.prog_test_run(bpf.xdp_udp_drop, arp_frame())[0] == bs.XDP_PASS


def test_data_out_is_the_frame(bpf):
    frame = tcp_frame()
    retval, _, out = bs.prog_test_run(bpf.xdp_pass, frame)
    assert retval == bs.XDP_PASS and out == frame
    assert bs.prog_test_run(bpf.xdp_pass, frame, data_out_size=0)[2] == b""


def test_repeat_and_duration(bpf):
    retval, duration, _ = bs.prog_test_run(bpf.xdp_udp_drop, udp_frame(), repeat=1000)
    assert retval == bs.XDP_DROP
    assert isinstance(duration, int) and 0 < duration < 10_000_000


def test_grown_frame_and_enospc(bpf):
    frame = tcp_frame()
    retval, _, out = bs.prog_test_run(bpf.xdp_push4, frame)
    assert retval == bs.XDP_PASS
    assert len(out) == len(frame) + 4 and out[4:] == frame
    with pytest.raises(OSError) as e:
        bs.prog_test_run(bpf.xdp_push4, frame, data_out_size=len(frame))
    assert e.value.errno == errno.ENOSPC
    assert f"produced {len(frame) + 4} bytes" in str(e.value)


def test_short_frame_is_einval(bpf):
    with pytest.raises(OSError) as e:
        bs.prog_test_run(bpf.xdp_pass, b"\0" * 10)
    assert e.value.errno == errno.EINVAL
    assert "bpf_prog_test_run" in str(e.value)


def test_ctx_in_sets_ingress_ifindex(bpf, vethns):
    ctxrec = bpf.b["ctxrec"]
    with xns.in_netns(vethns.name):
        vethns.guard(vethns.name, vethns.ia, vethns.a)
        retval, _, _ = bs.prog_test_run(bpf.xdp_ctx, tcp_frame(), ctx_in=bs.xdp_md_ctx(vethns.ia))
        assert retval == bs.XDP_PASS
        assert ctxrec[ctxrec.Key(0)].value == vethns.ia
        assert ctxrec[ctxrec.Key(1)].value == 0
        assert ctxrec[ctxrec.Key(2)].value == len(tcp_frame())  # data_end filled in
        # veth has one rx queue.
        with pytest.raises(OSError) as e:
            bs.prog_test_run(bpf.xdp_ctx, tcp_frame(), ctx_in=bs.xdp_md_ctx(vethns.ia, rx_queue=5))
        assert e.value.errno == errno.EINVAL
        # data_end beyond the frame is refused; a shorter one is the linear
        # part (the rest becomes fragments) on this kernel.
        with pytest.raises(OSError) as e:
            ctx = bs.xdp_md_ctx(vethns.ia, data_len=1000)
            bs.prog_test_run(bpf.xdp_ctx, tcp_frame(), ctx_in=ctx)
        assert e.value.errno == errno.EINVAL


@pytest.fixture
def live_frames():
    """Live-frame test runs, or a skip naming the kernel's refusal."""
    skip_refused("BPF_F_TEST_XDP_LIVE_FRAMES", bs.live_frames_refused())


def test_live_frames_refused_returns_the_errno(monkeypatch):
    """The probe reports the errno a refusing kernel answers with (the test
    run is made to fail as such a kernel's does) and None when it runs."""
    probe = bs.live_frames_refused.__wrapped__   # uncached
    assert probe() == bs.live_frames_refused()
    real = bs.prog_test_run

    def refused(fd, data, **kw):
        if kw.get("flags", 0) & bs.BPF_F_TEST_XDP_LIVE_FRAMES:
            raise OSError(errno.EPERM, "bpf_prog_test_run(... flags 2) failed: Operation not permitted")
        return real(fd, data, **kw)
    monkeypatch.setattr(bs, "prog_test_run", refused)
    assert probe() == errno.EPERM


def test_live_frames_xdp_tx(bpf, vethns, live_frames):
    """XDP_TX with live frames really transmits on veth a; b's program sees them."""
    counter = bpf.b["counter"]
    counter[counter.Key(0)] = counter.Leaf(0)
    frame = eth(0x88B5, bytes(50))  # local experimental ethertype, never IP
    n = 1000
    with xns.in_netns(vethns.name):
        vethns.guard(vethns.name, vethns.ib, vethns.b)
        bs.xdp_attach(vethns.ib, bpf.xdp_count_drop, bs.XDP_FLAGS_DRV_MODE)
        try:
            vethns.guard(vethns.name, vethns.ia, vethns.a)
            retval, _, out = bs.prog_test_run(
                bpf.xdp_tx, frame, repeat=n, ctx_in=bs.xdp_md_ctx(vethns.ia),
                flags=bs.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64,
            )
            assert out == b""
            deadline = time.monotonic() + 5
            while counter[counter.Key(0)].value < n and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            bs.xdp_detach(vethns.ib, bs.XDP_FLAGS_DRV_MODE)
    # The veth ring (256 frames) could overflow under a burst: allow losses,
    # never more frames than were sent.
    seen = counter[counter.Key(0)].value
    assert n // 2 <= seen <= n


def test_live_frames_refuse_data_out(bpf, vethns, live_frames):
    with xns.in_netns(vethns.name):
        vethns.guard(vethns.name, vethns.ia, vethns.a)
        with pytest.raises(OSError) as e:
            bs.prog_test_run(
                bpf.xdp_pass, arp_frame(), data_out_size=256,
                ctx_in=bs.xdp_md_ctx(vethns.ia), flags=bs.BPF_F_TEST_XDP_LIVE_FRAMES,
            )
        assert e.value.errno == errno.EINVAL


# ---- info, ids, pins --------------------------------------------------------


def test_prog_info(bpf):
    info = bs.prog_info(bpf.xdp_count_drop)
    assert info["type"] == bs.BPF_PROG_TYPE_XDP
    assert info["name"] == "xdp_count_drop"
    assert len(info["tag"]) == 16 and int(info["tag"], 16) >= 0
    assert info["jited_prog_len"] > 0 and info["xlated_prog_len"] > 0
    assert info["map_ids"] == [bs.map_info(bpf.b["counter"].map_fd)["id"]]
    assert bs.prog_info(bpf.xdp_pass)["map_ids"] == []
    with pytest.raises(OSError) as e:
        bs.prog_info(-1)
    assert e.value.errno == errno.EBADFD  # sic: this syscall says EBADFD, not EBADF


def test_map_info(bpf):
    info = bs.map_info(bpf.b["h"].map_fd)
    assert info["name"] == "h"
    assert (info["type"], info["key_size"], info["value_size"], info["max_entries"]) == (
        bs.BPF_MAP_TYPE_HASH, 4, 8, 64,
    )


def test_get_fd_by_id(bpf):
    pid = bs.prog_info(bpf.xdp_pass)["id"]
    with bs.closing_fd(bs.prog_get_fd_by_id(pid)) as fd:
        assert fd != bpf.xdp_pass and bs.prog_info(fd)["id"] == pid
    mid = bs.map_info(bpf.b["h"].map_fd)["id"]
    with bs.closing_fd(bs.map_get_fd_by_id(mid)) as fd:
        assert bs.map_info(fd)["id"] == mid
    with pytest.raises(OSError) as e:
        bs.map_get_fd_by_id(0xFFFFFFF0)
    assert e.value.errno == errno.ENOENT


def test_pin_and_get(bpf, pindir):
    h = bpf.b["h"]
    mpath, ppath = os.path.join(pindir, "h"), os.path.join(pindir, "prog")
    bs.obj_pin(h.map_fd, mpath)
    bs.obj_pin(bpf.xdp_udp_drop, ppath)
    with pytest.raises(OSError) as e:
        bs.obj_pin(h.map_fd, mpath)
    assert e.value.errno == errno.EEXIST
    with bs.closing_fd(bs.obj_get(mpath)) as mfd, bs.closing_fd(bs.obj_get(ppath)) as pfd:
        assert bs.map_info(mfd)["id"] == bs.map_info(h.map_fd)["id"]
        assert bs.prog_info(pfd)["id"] == bs.prog_info(bpf.xdp_udp_drop)["id"]
        # The pinned fd is the same map as bcc's table.
        bs.map_update(mfd, U32.pack(77), U64.pack(7700))
        assert h[h.Key(77)].value == 7700
        assert bs.prog_test_run(pfd, udp_frame())[0] == bs.XDP_DROP
        del h[h.Key(77)]
    with pytest.raises(FileNotFoundError) as e:
        bs.obj_get(os.path.join(pindir, "missing"))
    assert "bpf_obj_get" in str(e.value)


# ---- map operations ----------------------------------------------------------


def test_map_elem_ops_on_bcc_map(bpf):
    fd = bpf.b["h"].map_fd
    k1, k2 = U32.pack(1), U32.pack(2)
    assert bs.map_lookup(fd, k1, 8) is None
    bs.map_update(fd, k1, U64.pack(10))
    bs.map_update(fd, k2, U64.pack(20), bs.BPF_NOEXIST)
    with pytest.raises(OSError) as e:
        bs.map_update(fd, k2, U64.pack(21), bs.BPF_NOEXIST)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        bs.map_update(fd, U32.pack(3), U64.pack(30), bs.BPF_EXIST)
    assert e.value.errno == errno.ENOENT
    assert bs.map_lookup(fd, k2, 8) == U64.pack(20)
    assert sorted(bs.map_keys(fd, 4)) == sorted([k1, k2])
    first = bs.map_get_next_key(fd, None, 4)
    second = bs.map_get_next_key(fd, first, 4)
    assert {first, second} == {k1, k2}
    assert bs.map_get_next_key(fd, second, 4) is None
    assert bs.map_delete(fd, k1) is True
    assert bs.map_delete(fd, k1) is False
    assert bs.map_delete(fd, k2) is True
    assert bs.map_get_next_key(fd, None, 4) is None


def test_batch_ops_hash(bpf):
    fd = bpf.b["h"].map_fd
    n = 40
    keys = b"".join(U32.pack(i) for i in range(n))
    values = b"".join(U64.pack(i * 100) for i in range(n))
    try:
        assert bs.map_update_batch(fd, keys, values, n) == n
        assert bs.map_lookup(fd, U32.pack(39), 8) == U64.pack(3900)
        items = dict(bs.map_items_batch(fd, 4, 8, chunk=4))  # small chunk: several steps
        assert items == {U32.pack(i): U64.pack(i * 100) for i in range(n)}
        # One step from the start: some elements and a continuation token.
        ks, vs, got, token = bs.map_lookup_batch(fd, 4, 8, 64)
        assert got == n and token is None and len(ks) == 4 * n and len(vs) == 8 * n
        # Batch update is always BPF_ANY: the kernel refuses NOEXIST/EXIST.
        with pytest.raises(OSError) as e:
            bs.map_update_batch(fd, keys[:8], values[:16], 2, bs.BPF_NOEXIST)
        assert e.value.errno == errno.EINVAL
        assert bs.map_update_batch(fd, keys[:8], values[:16], 2) == 2
        assert bs.map_delete_batch(fd, keys[: 4 * 10], 10) == 10
        with pytest.raises(OSError) as e:
            bs.map_delete_batch(fd, keys[4 * 8 : 4 * 12], 4)  # 8 and 9 are gone
        assert e.value.errno == errno.ENOENT and e.value.count == 0
        with pytest.raises(OSError) as e:
            bs.map_delete_batch(fd, keys[4 * 10 : 4 * 12] + U32.pack(5), 3)
        assert e.value.errno == errno.ENOENT and e.value.count == 2  # 10, 11 deleted
        assert len(bs.map_items_batch(fd, 4, 8)) == n - 12
    finally:
        for k in list(bs.map_keys(fd, 4)):
            bs.map_delete(fd, k)


def test_map_create_hash(bpf):
    with bs.closing_fd(bs.map_create(bs.BPF_MAP_TYPE_HASH, "xgt_hash", 8, 16, 128)) as fd:
        info = bs.map_info(fd)
        fields = ("name", "type", "key_size", "value_size", "max_entries")
        assert [info[f] for f in fields] == ["xgt_hash", bs.BPF_MAP_TYPE_HASH, 8, 16, 128]
        keys = b"".join(U64.pack(i) for i in range(128))
        values = b"".join(bytes([i]) * 16 for i in range(128))
        assert bs.map_update_batch(fd, keys, values, 128) == 128
        with pytest.raises(OSError) as e:  # full
            bs.map_update(fd, U64.pack(1000), bytes(16))
        assert e.value.errno == errno.E2BIG
        assert len(bs.map_items_batch(fd, 8, 16, chunk=16)) == 128


def test_map_create_array_and_lpm(bpf):
    with bs.closing_fd(bs.map_create(bs.BPF_MAP_TYPE_ARRAY, "xgt_arr", 4, 8, 4)) as fd:
        assert bs.map_lookup(fd, U32.pack(3), 8) == bytes(8)
        assert bs.map_lookup(fd, U32.pack(4), 8) is None
        with pytest.raises(OSError) as e:
            bs.map_delete(fd, U32.pack(0))
        assert e.value.errno == errno.EINVAL
        ks, vs, got, token = bs.map_lookup_batch(fd, 4, 8, 10)
        assert got == 4 and token is None
    # LPM tries need BPF_F_NO_PREALLOC; key = u32 prefixlen + data.
    with pytest.raises(OSError) as e:
        bs.map_create(bs.BPF_MAP_TYPE_LPM_TRIE, "xgt_lpm", 8, 4, 16)
    assert e.value.errno == errno.EINVAL
    with bs.closing_fd(
        bs.map_create(bs.BPF_MAP_TYPE_LPM_TRIE, "xgt_lpm", 8, 4, 16, bs.BPF_F_NO_PREALLOC)
    ) as fd:
        bs.map_update(fd, U32.pack(8) + bytes([10, 0, 0, 0]), U32.pack(1))
        assert bs.map_lookup(fd, U32.pack(32) + bytes([10, 1, 2, 3]), 4) == U32.pack(1)
        assert bs.map_lookup(fd, U32.pack(32) + bytes([11, 1, 2, 3]), 4) is None
        # Tries have the generic batch ops (get_next_key order: longest first).
        assert bs.map_update_batch(fd, U32.pack(16) + bytes([10, 1, 0, 0]), U32.pack(2), 1) == 1
        ks, vs, got, token = bs.map_lookup_batch(fd, 8, 4, 4)
        assert got == 2 and token is None
        assert set(bs.map_items_batch(fd, 8, 4)) == {
            (U32.pack(8) + bytes([10, 0, 0, 0]), U32.pack(1)),
            (U32.pack(16) + bytes([10, 1, 0, 0]), U32.pack(2)),
        }
        assert bs.map_delete_batch(fd, U32.pack(16) + bytes([10, 1, 0, 0]), 1) == 1
    with pytest.raises(OSError) as e:
        bs.map_create(bs.BPF_MAP_TYPE_HASH, "bad name!", 4, 4, 4)
    assert e.value.errno == errno.EINVAL


def test_percpu(bpf):
    ncpu = bs.num_possible_cpus()
    assert ncpu >= 1
    # 12-byte values: the kernel pads each CPU's copy to 16.
    assert bs.percpu_value_size(12) == 16 * ncpu
    with bs.closing_fd(bs.map_create(bs.BPF_MAP_TYPE_PERCPU_ARRAY, "xgt_pcpu", 4, 12, 2)) as fd:
        size = bs.percpu_value_size(12)
        vals = [bytes([c + 1]) * 12 for c in range(ncpu)]
        bs.map_update(fd, U32.pack(1), bs.percpu_join(vals, 12))
        buf = bs.map_lookup(fd, U32.pack(1), size)
        assert len(buf) == size and bs.percpu_split(buf, 12) == vals
        ks, vs, got, _ = bs.map_lookup_batch(fd, 4, size, 2)
        assert got == 2 and bs.percpu_split(vs[size:], 12) == vals
    with pytest.raises(ValueError):
        bs.percpu_join([b"x"] * (ncpu + 1), 1)


# ---- XDP attach / query / detach ---------------------------------------------


def test_attach_native_query_detach(bpf, vethns):
    pid = bs.prog_info(bpf.xdp_pass)["id"]
    with xns.in_netns(vethns.name):
        vethns.guard(vethns.name, vethns.ia, vethns.a)
        assert bs.xdp_query(vethns.ia) == {
            "prog_id": 0, "attach_mode": "none",
            "drv_prog_id": 0, "skb_prog_id": 0, "hw_prog_id": 0,
        }
        bs.xdp_attach(vethns.ia, bpf.xdp_pass, bs.XDP_FLAGS_DRV_MODE)
        q = bs.xdp_query(vethns.ia)
        mode = (q["prog_id"], q["attach_mode"], q["drv_prog_id"], q["skb_prog_id"])
        assert mode == (pid, "native", pid, 0)
        # Only one mode at a time; the kernel's reason is in the message.
        with pytest.raises(OSError) as e:
            bs.xdp_attach(vethns.ia, bpf.xdp_pass, bs.XDP_FLAGS_SKB_MODE)
        assert e.value.errno == errno.EEXIST
        assert "generic" in str(e.value).lower()
        # UPDATE_IF_NOEXIST refuses while a program is attached.
        with pytest.raises(OSError) as e:
            flags = bs.XDP_FLAGS_DRV_MODE | bs.XDP_FLAGS_UPDATE_IF_NOEXIST
            bs.xdp_attach(vethns.ia, bpf.xdp_udp_drop, flags)
        assert e.value.errno == errno.EBUSY
        # Detaching in the wrong mode is a silent no-op in the kernel.
        bs.xdp_detach(vethns.ia, bs.XDP_FLAGS_SKB_MODE)
        assert bs.xdp_query(vethns.ia)["prog_id"] == pid
        bs.xdp_detach(vethns.ia, bs.XDP_FLAGS_DRV_MODE)
        assert bs.xdp_query(vethns.ia)["attach_mode"] == "none"
        assert bs.xdp_query(vethns.ib)["attach_mode"] == "none"
        bs.xdp_detach(vethns.ia)  # nothing attached: no error


def test_attach_generic(bpf, vethns):
    pid = bs.prog_info(bpf.xdp_udp_drop)["id"]
    with xns.in_netns(vethns.name):
        vethns.guard(vethns.name, vethns.ib, vethns.b)
        bs.xdp_attach(vethns.ib, bpf.xdp_udp_drop, bs.XDP_FLAGS_SKB_MODE)
        try:
            q = bs.xdp_query(vethns.ib)
            mode = (q["prog_id"], q["attach_mode"], q["skb_prog_id"], q["drv_prog_id"])
            assert mode == (pid, "generic", pid, 0)
            with bs.closing_fd(bs.prog_get_fd_by_id(q["prog_id"])) as fd:
                assert bs.prog_info(fd)["name"] == "xdp_udp_drop"
        finally:
            bs.xdp_detach(vethns.ib)  # no mode flag: the attached mode is looked up
        assert bs.xdp_query(vethns.ib)["prog_id"] == 0


@pytest.mark.parametrize("mode", [bs.XDP_FLAGS_DRV_MODE, bs.XDP_FLAGS_SKB_MODE])
def test_replace(bpf, vethns, mode):
    p1, p2 = bpf.xdp_pass, bpf.xdp_udp_drop
    id1, id2 = bs.prog_info(p1)["id"], bs.prog_info(p2)["id"]
    with xns.in_netns(vethns.name):
        vethns.guard(vethns.name, vethns.ia, vethns.a)
        bs.xdp_attach(vethns.ia, p1, mode)
        try:
            bs.xdp_attach(vethns.ia, p2, mode, old_prog_fd=p1)
            assert bs.xdp_query(vethns.ia)["prog_id"] == id2
            # p1 is no longer attached: replacing it must fail, p2 stays.
            with pytest.raises(OSError) as e:
                bs.xdp_attach(vethns.ia, p1, mode, old_prog_fd=p1)
            assert e.value.errno == errno.EEXIST
            assert "expected" in str(e.value)  # kernel extack text
            assert bs.xdp_query(vethns.ia)["prog_id"] == id2
            # Detach only if the expected program is attached.
            with pytest.raises(OSError) as e:
                bs.xdp_detach(vethns.ia, mode, old_prog_fd=p1)
            assert e.value.errno == errno.EEXIST
            bs.xdp_detach(vethns.ia, mode, old_prog_fd=p2)
            assert bs.xdp_query(vethns.ia)["prog_id"] == 0
            assert id1 != id2
        finally:
            if bs.xdp_query(vethns.ia)["prog_id"]:
                bs.xdp_detach(vethns.ia, mode)


def test_attach_bad_ifindex(bpf, vethns):
    with xns.in_netns(vethns.name):
        with pytest.raises(OSError) as e:
            bs.xdp_attach(999_999, bpf.xdp_pass, bs.XDP_FLAGS_SKB_MODE)
        assert e.value.errno == errno.ENODEV
        with pytest.raises(OSError):
            bs.xdp_query(999_999)
        with pytest.raises(ValueError):
            bs.xdp_attach(vethns.ia, bpf.xdp_pass, bs.XDP_FLAGS_SKB_MODE, old_prog_fd=0)


# ---- netns ------------------------------------------------------------------


def test_in_netns_enters_and_restores(vethns):
    host = _thread_netns_ino()
    with xns.in_netns(vethns.name):
        assert _thread_netns_ino() == _netns_ino(vethns.name)
        assert socket.if_nametoindex(vethns.a) == vethns.ia
    assert _thread_netns_ino() == host
    with pytest.raises(RuntimeError):
        with xns.in_netns(vethns.name):
            raise RuntimeError("boom")
    assert _thread_netns_ino() == host
    for noop in (None, "host"):
        with xns.in_netns(noop):
            assert _thread_netns_ino() == host


def test_in_netns_is_per_thread(vethns):
    host = _thread_netns_ino()
    seen = {}

    def worker():
        with xns.in_netns(vethns.name):
            seen["inside"] = _thread_netns_ino()
            main_tid = threading.main_thread().native_id
            seen["main"] = os.stat(f"/proc/{os.getpid()}/task/{main_tid}/ns/net").st_ino
        seen["after"] = _thread_netns_ino()

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert seen == {"inside": _netns_ino(vethns.name), "main": host, "after": host}
    assert _thread_netns_ino() == host


def test_in_netns_missing():
    name = unique("xgt", 11)
    with pytest.raises(xns.NetnsError, match="does not exist"):
        with xns.in_netns(name):
            pass  # pragma: no cover
    assert not os.path.exists(f"/run/netns/{name}")  # nothing was created
    with pytest.raises(ValueError):
        with xns.in_netns("../etc"):
            pass  # pragma: no cover


def test_ifindex(vethns):
    assert xns.ifindex(vethns.a, vethns.name) == vethns.ia
    assert xns.ifindex(vethns.b, vethns.name) == vethns.ib
    with pytest.raises(xns.NetnsError, match="no interface"):
        xns.ifindex("nonexist0", vethns.name)
    with pytest.raises(xns.NetnsError, match="no interface"):
        xns.ifindex(vethns.a)  # not in the host namespace
    with pytest.raises(xns.NetnsError, match="does not exist"):
        xns.ifindex("eth0", unique("xgt", 11))


@pytest.mark.parametrize("name", ["eth0", "veth-a.1", "x_y", "a" * 15])
def test_check_name_ok(name):
    assert xns.check_name(name, "iface") == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "eth0:1", "a" * 16, "ä", None])
def test_check_name_bad_iface(name):
    with pytest.raises(ValueError):
        xns.check_name(name, "iface")


def test_check_name_netns():
    assert xns.check_name("a" * 40) == "a" * 40
    assert xns.check_name("host") == "host"
    for bad in ("", "..", "x/y", "a;b", "a" * 256):
        with pytest.raises(ValueError):
            xns.check_name(bad)
