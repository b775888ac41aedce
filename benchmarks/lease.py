"""What one writer per run costs: taking and giving up a run's writer lease, and how soon a second job is refused.

    python -m benchmarks.lease [--repeats 20] [--ttl 60] [--out DIR]

Rows: the lease on the local disk (an flock and a record written as a checkpoint file is: temporary, fsync,
rename) and on a moto S3 server on 127.0.0.1 (an exclusive PUT, a read, a delete at release), each the median of
``--repeats`` take-and-release pairs; then, on the store, how long a newcomer takes to be refused beside a live
holder in another process that renews every ``ttl / 3`` (a third of ``--ttl`` at most). Once per job, so these
are set against the save they precede, not measured as ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HOLD = (
    "import sys; from ckptio.lease import WriterLease; from ckptio.storage import Storage\n"
    "WriterLease.take(Storage(sys.argv[1], __import__('json').loads(sys.argv[2])), 'run', float(sys.argv[3]))\n"
    "print('HELD', flush=True); sys.stdin.read()"
)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ttl", type=float, default=60.0, help="the store lease's ttl (writer_lease_s)")
    p.add_argument("--out", help="write lease.json here")
    args = p.parse_args(argv)
    import s3fs
    from moto.server import ThreadedMotoServer

    from ckptio.errors import WriterConflictError
    from ckptio.lease import WriterLease, lease_names
    from ckptio.storage import Storage

    rows: dict[str, float] = {}
    local = Storage(os.path.join(tempfile.mkdtemp(prefix="ckptio-lease-"), "checkpoints"))
    rows["local_take_release_ms"] = _median_ms(lambda: WriterLease.take(local, "run", args.ttl).release(), args.repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        bucket = f"lease{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(**opts, skip_instance_cache=True).mkdir(bucket)
        store = Storage(f"s3://{bucket}/run/checkpoints", opts)
        store.listdir()  # the client set up, as in a job that listed its run first
        take = lambda: WriterLease.take(store, "run", args.ttl).release()  # noqa: E731
        rows["s3_take_release_ms"] = _median_ms(take, args.repeats)
        holder = subprocess.Popen([sys.executable, "-c", HOLD, store.url(), json.dumps(opts), str(args.ttl)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
            name = lease_names("run")[0]
            record = json.loads(store.read_bytes(name))
            record["host"] = "another-host"  # as a newcomer on another node sees it: not this host's dead pid
            store.write_bytes(name, json.dumps(record).encode())
            start = time.perf_counter()
            try:
                WriterLease.take(store, "run", args.ttl).release()
                raise AssertionError("a live holder's lease was taken")
            except WriterConflictError:
                rows["s3_refused_beside_a_live_holder_s"] = time.perf_counter() - start
        finally:
            holder.kill()
            holder.wait()
    finally:
        server.stop()
    for key, value in rows.items():
        print(f"{key}: {value:.2f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lease.json"), "w") as f:
            json.dump({"ttl_s": args.ttl, "repeats": args.repeats, **rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
