"""A real S3-compatible HTTP server (moto's) on 127.0.0.1 that logs each request (and its Range), for the tests.

python tests/s3_server.py --port 0 --log requests.log   # prints "PORT <n>" when serving
"""

import argparse
import logging
import sys
import threading

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", required=True)
    args = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    log = open(args.log, "a", buffering=1)

    def logged(environ, start_response):
        with lock:
            ranged = f" range={environ['HTTP_RANGE']}" if "HTTP_RANGE" in environ else ""
            log.write(
                f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}?{environ.get('QUERY_STRING', '')}{ranged}\n"
            )
        return app(environ, start_response)

    server = make_server("127.0.0.1", args.port, logged, threaded=True)
    print(f"PORT {server.server_port}", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
