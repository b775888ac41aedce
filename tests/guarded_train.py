"""launch.train with every storage write forbidden on non-master ranks (run under torchrun by tests).

Any attempt by rank != 0 to write, rename, link or delete a file under the run directory raises,
which fails the job: the proof that only the master touches storage.
"""

import builtins
import os
import sys

import ckptio.storage
from launch import train


def _forbid(run_dir: str) -> None:
    run_dir = os.path.abspath(run_dir)

    def inside(path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(run_dir)
        except TypeError:
            return False

    def refuse(what, *paths):
        raise RuntimeError(f"rank {os.environ.get('RANK')} attempted {what} {paths}")

    def guard(fn, what):
        def wrapped(*args, **kwargs):
            if any(inside(a) for a in args if isinstance(a, (str, os.PathLike))):
                refuse(what, *args)
            return fn(*args, **kwargs)

        return wrapped

    for name in ("replace", "rename", "link", "unlink", "remove", "makedirs", "mkdir"):
        setattr(os, name, guard(getattr(os, name), name))
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse("open for writing", file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse("os.open for writing", path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open, os.open = guarded_open, guarded_os_open
    for method in ("write", "write_bytes", "delete", "clean_temporaries"):
        setattr(ckptio.storage.Storage, method, lambda self, *a, _m=method, **k: refuse(f"Storage.{_m}", *a))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if os.environ.get("RANK", "0") != "0":
        _forbid(argv[argv.index("--run-dir") + 1])
    sys.exit(train.main(argv))
