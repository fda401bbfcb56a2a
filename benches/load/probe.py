#!/usr/bin/env python3
"""Client-side probes of the load comparison (stdlib only).

  probe.py burst HOST PORT PATH N [WAIT_S]
      Waits until HOST:PORT accepts connections (at most WAIT_S, default 30), then sends N
      requests at once, each on its own connection. Prints JSON: {"sent", "statuses", "errors",
      "elapsed_s"}.

  probe.py idle HOST PORT PATH N HOLD_S READY_FILE
      Opens N keep-alive connections, sends one request on each and reads the answer, writes
      READY_FILE with a JSON summary once all are established and idle, holds them for HOLD_S
      seconds, then closes them. Prints the same summary. PATH "-" opens the connections without
      sending anything.
"""

import asyncio
import json
import sys
import time


def request_bytes(host, port, path):
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: probe\r\n"
        f"Accept: application/json\r\n\r\n"
    ).encode()


async def read_response(reader):
    """Reads one HTTP/1.1 response with a Content-Length or chunked body; returns the status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def wait_port(host, port, wait_s):
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.002)


async def burst(host, port, path, n, wait_s):
    await wait_port(host, port, wait_s)
    req = request_bytes(host, port, path)
    statuses = {}
    errors = []
    latencies = []
    start = asyncio.Event()
    ready = [0]

    def arrived():
        ready[0] += 1
        if ready[0] == n:
            start.set()

    async def one():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except Exception as e:  # noqa: BLE001 - every failure is counted, whatever it is
            errors.append(type(e).__name__)
            arrived()
            return
        arrived()
        try:
            # Every connection is open before any request is sent: the requests then arrive
            # together, while the proxy's first token fetch is still in flight.
            await start.wait()
            t = time.monotonic()
            writer.write(req)
            await writer.drain()
            status = await asyncio.wait_for(read_response(reader), 60)
            latencies.append(time.monotonic() - t)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            writer.close()
        except Exception as e:  # noqa: BLE001
            errors.append(type(e).__name__)

    t0 = time.monotonic()
    await asyncio.gather(*[one() for _ in range(n)])
    latencies.sort()
    return {
        "sent": n,
        "statuses": statuses,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "elapsed_s": round(time.monotonic() - t0, 3),
        "first_response_s": round(latencies[0], 3) if latencies else None,
        "last_response_s": round(latencies[-1], 3) if latencies else None,
    }


async def idle(host, port, path, n, hold_s, ready_file):
    # PATH "-": connect only, never send a request (what an idle connection costs before use).
    req = None if path == "-" else request_bytes(host, port, path)
    conns = []
    statuses = {}
    errors = []
    gate = asyncio.Semaphore(256)

    async def one():
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                if req is not None:
                    writer.write(req)
                    await writer.drain()
                    status = await asyncio.wait_for(read_response(reader), 60)
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                conns.append(writer)
            except Exception as e:  # noqa: BLE001
                errors.append(type(e).__name__)

    t0 = time.monotonic()
    await asyncio.gather(*[one() for _ in range(n)])
    summary = {
        "requested": n,
        "open": len(conns),
        "statuses": statuses,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "setup_s": round(time.monotonic() - t0, 3),
    }
    with open(ready_file, "w") as f:
        json.dump(summary, f)
    await asyncio.sleep(hold_s)
    for w in conns:
        w.close()
    return summary


def main():
    cmd = sys.argv[1]
    if cmd == "burst":
        host, port, path, n = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        wait_s = float(sys.argv[6]) if len(sys.argv) > 6 else 30.0
        print(json.dumps(asyncio.run(burst(host, port, path, n, wait_s))))
    elif cmd == "idle":
        host, port, path = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        n, hold_s, ready = int(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
        print(json.dumps(asyncio.run(idle(host, port, path, n, hold_s, ready))))
    else:
        sys.exit(f"unknown probe {cmd}")


if __name__ == "__main__":
    main()
