#!/usr/bin/env python3
"""Where the proxy's CPU time goes, from `perf script` output of a call-graph recording.

    perf record -F 999 --call-graph dwarf,32768 -p <proxy pid> -o perf.data -- sleep 8
    perf script -i perf.data -F comm,tid,ip,sym | python3 benches/load/perf_breakdown.py

Every sample is put in the first bucket (in the order below) whose pattern matches any frame
of its stack, so the shares add up to 100%. The buckets are the phases a reader of
src/pipeline/ knows; "kernel: ..." buckets are syscalls not already claimed by a user-space phase.
"""

import re
import sys
from collections import Counter

# (bucket, regex over the frames of one stack); first match wins.
BUCKETS = [
    ("access log (formatting + stderr write)", r"sitecore_auth_proxy::logging::|tracing_subscriber|tracing_core::event|nu_ansi_term"),
    ("metrics (route handles, prometheus-client families, history ring)", r"metrics::|prometheus_client"),
    ("request id (rand + hex format)", r"pipeline::request_id|rand::"),
    ("token read (ArcSwap)", r"OAuthCredential>::current|OAuthCredential::current|arc_swap"),
    ("route + path check + header hygiene", r"routes::check_path|RouteTable>::find|RouteTable::find|strip_hop_by_hop|strip_inbound_credentials|upstream_path_and_query"),
    ("kernel: socket write (sendmsg/writev)", r"do_writev|__sys_sendto|__sys_sendmsg|tcp_sendmsg"),
    ("kernel: socket read (recv/readv)", r"__sys_recvfrom|__sys_recvmsg|do_readv|tcp_recvmsg|ksys_read"),
    ("kernel: epoll", r"do_epoll_wait|ep_poll|epoll_wait"),
    ("kernel: futex (thread park/unpark)", r"futex"),
    ("kernel: accept/other syscalls", r"do_syscall_64"),
    ("kernel: softirq/irq/scheduler (no syscall)", r"^ffffffff"),
    ("timer (tokio::time::timeout, sleep; user space)", r"tokio::runtime::time|tokio::time::"),
    ("upstream client (our pool and its connection tasks: hyper h1 client)", r"sitecore_auth_proxy::upstream::(pool|connect)::|hyper_util::client::legacy|hyper::client::"),
    ("hyper h1 server (parse/encode, dispatch)", r"hyper::proto::h1|hyper::server|hyper_util::server"),
    ("limits (GCRA, in-flight, RateLimit fields)", r"sitecore_auth_proxy::limits::|governor::"),
    ("proxy pipeline (process_request, TrackedBody)", r"sitecore_auth_proxy::pipeline::"),
    ("malloc/free", r"malloc|_int_free|cfree|__libc_free|unlink_chunk"),
    ("tokio scheduler", r"tokio::runtime"),
    ("other", r"."),
]


def stacks(lines):
    current = None
    for line in lines:
        if not line.strip():
            if current is not None:
                yield current
                current = None
            continue
        if not line.startswith(("\t", " " * 8)) and current is None:
            current = []
            continue
        if current is not None:
            parts = line.strip().split(" ", 1)
            addr = parts[0]
            sym = parts[1] if len(parts) > 1 else ""
            current.append(f"{addr} {sym}" if addr.startswith("ffffffff") else sym)
    if current is not None:
        yield current


def main():
    compiled = [(name, re.compile(p, re.M)) for name, p in BUCKETS]
    counts = Counter()
    total = 0
    for frames in stacks(sys.stdin):
        total += 1
        text = "\n".join(frames)
        for name, rx in compiled:
            if name.startswith("kernel: softirq"):
                # Kernel-only stacks (interrupts, softirq on a user frame) with no syscall.
                if frames and frames[0].startswith("ffffffff") and "do_syscall_64" not in text:
                    counts[name] += 1
                    break
                continue
            if rx.search(text):
                counts[name] += 1
                break
    print(f"{total} samples")
    for name, _ in BUCKETS:
        if counts[name]:
            print(f"{100.0 * counts[name] / total:6.1f}%  {name}")


if __name__ == "__main__":
    main()
