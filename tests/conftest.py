import atexit
import os
import shutil
import sys
import tempfile

import psutil
import pytest
import torch

import ckptio

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)

ckptio.allow_architecture_modules("archs")
# keep the node-local cache of remote checkpoints out of the user's home during tests
if "CKPTIO_CACHE_DIR" not in os.environ:
    os.environ["CKPTIO_CACHE_DIR"] = tempfile.mkdtemp(prefix="ckptio-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CKPTIO_CACHE_DIR"], ignore_errors=True)


# every process a test starts carries the test's id: whatever is still alive after the test leaked
PROCESS_MARK = "CKPTIO_TEST_PROCESS"
_current_test: dict[str, str] = {}


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes that import the test architectures and the launch package."""
    env = dict(os.environ)
    if "id" in _current_test:
        env[PROCESS_MARK] = _current_test["id"]
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, REPO_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


@pytest.fixture
def env_meta():
    from archs import ENV

    return dict(ENV)


@pytest.fixture
def policy(env_meta):
    from archs import MLPArch

    torch.manual_seed(0)
    return MLPArch().make_policy(env_meta)


PYTHON = sys.executable


def torchrun_cmd(module: str, *args: str, nproc: int = 2) -> list[str]:
    """A real 2-process torchrun; standalone rendezvous picks a free port, so xdist workers don't collide."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]


def run_torchrun(module: str, *args: str, timeout: float = 120, check: bool = True, **env: str):
    import subprocess

    proc = subprocess.run(
        torchrun_cmd(module, *args), cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {module} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc


def run_nodes(module: str, nodes: int, node_args, caches: list[str], *, nproc: int = 1, timeout: float = 240):
    """N torchrun agents side by side, as N nodes (``--nnodes=N --node_rank=i``, a rendezvous on 127.0.0.1), node
    ``i`` running ``module`` with ``node_args(i)`` and its own node cache; returns (returncode, stdout, stderr) each."""
    import subprocess

    from remote_fixtures import free_port

    port = free_port()
    procs = []
    for i in range(nodes):
        cmd = [PYTHON, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={nproc}",
               f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", module, *node_args(i)]  # fmt: skip
        env = subprocess_env(CKPTIO_CACHE_DIR=caches[i])
        procs.append(
            subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            kill_tree(p.pid)
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def _marked(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(PROCESS_MARK) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind(request):
    """Fails the test if a process it started outlives it (torchrun workers live in sessions of their own)."""
    token = f"{os.getpid()}:{request.node.nodeid}"
    _current_test["id"] = token
    yield
    del _current_test["id"]
    _, alive = psutil.wait_procs(_marked(token), timeout=10)  # bounded: ones already told to exit finish
    for proc in alive:
        proc.kill()
    if alive:
        pytest.fail(f"{len(alive)} processes outlived the test: {[p.pid for p in alive]} (killed now)")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, wherever their sessions are, and reap them."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def pytest_addoption(parser):
    parser.addoption("--stress", action="store_true", help="crash harness: thousands of SIGKILLs instead of 30")
    parser.addoption("--kills", type=int, default=None, help="crash harness: exact number of SIGKILLs per writer")


@pytest.fixture(scope="session")
def forkserver():
    """A multiprocessing context whose children fork from a server that already imported torch and ckptio."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # the forkserver imports its preload list before it applies sys.path: give it PYTHONPATH
    os.environ["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]
    ctx.set_forkserver_preload(["torch", "ckptio", "crash_jobs"])
    return ctx


from remote_fixtures import gcs, s3  # noqa: E402, F401  (object-storage server fixtures)

# the files whose tests run torchrun jobs or servers: scheduled first, so that on two workers the
# last minutes are not one long job on one worker while the other sits idle
LONG_FIRST = (
    "test_sharded.py",
    "test_nodes.py",
    "test_torchrun.py",
    "test_benchmarks.py",
    "test_remote.py",
    "test_everyday.py",
)


def pytest_collection_modifyitems(config, items):
    def weight(item):
        name = item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=weight)
