"""Run at startup by every Python process the tests start (``tests/`` is on their PYTHONPATH)."""

import atexit
import gc

# An exiting interpreter's last garbage collection walks torch's whole object graph: about 0.7 s at the end of
# every process a test starts, and a torchrun job waits for three in turn. The operating system frees it anyway.
# Registered first, this runs after every other exit handler (ckptio's close at exit included).
atexit.register(gc.freeze)
