"""What planning a batch on an object store asks the store: requests and seconds.

Why: planning must list each input once and the output prefix once, never download an
input and never ask about each output (a HEAD per file is a round trip per file, hours on
a million-object bucket). This script puts a tree of empty `.png` objects on moto's S3
server on 127.0.0.1 (half of them with their output present), plans
`mprnet derain s3://bench/rainy -r -o s3://bench/clean` and counts the server's requests.

    python benchmarks/store_planning.py                  # 2,000 inputs in 20 folders
    python benchmarks/store_planning.py --objects 100    # a quick check that it runs

The server is local: a real store adds a round trip (tens of milliseconds) per request.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from moto.server import ThreadedMotoServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    args = parser.parse_args()

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    from mprnet_cli.pipeline import OutputNaming, plan_jobs

    log = logging.getLogger("werkzeug")  # the server's request log
    log.setLevel(logging.WARNING)  # quiet while the objects go up
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    for index in range(args.objects):
        name = f"{index // 100}/{index}.png"
        fs.pipe_file(f"bench/rainy/{name}", b"")
        if index % 2:
            fs.pipe_file(f"bench/clean/{name}", b"")

    requests: list[str] = []

    class Counter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            requests.append(record.getMessage().split('"')[1])

    log.addHandler(Counter())
    log.setLevel(logging.INFO)
    log.propagate = False
    started = time.perf_counter()
    plan = plan_jobs(["s3://bench/rainy"], OutputNaming("derain", output="s3://bench/clean", recursive=True))
    seconds = time.perf_counter() - started
    server.stop()
    print(f"{args.objects} inputs: {len(plan.jobs)} to do, {len(plan.skipped)} skipped; "
          f"{len(requests)} requests in {seconds:.2f} s")
    for request in requests:
        print("  ", request)


if __name__ == "__main__":
    main()
