"""A thread prints to a block-buffered stdout without pause while the main thread
forks children, 3 ms apart, that print one line each.  A child forked while the
thread held stdout's buffer lock blocks for ever in its print().  The children are
waited for at the end."""

import os
import sys
import threading
import time
import warnings

warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded ... fork()"


def printer():
    for i in range(200_000):  # bounded: at most ~2.6 MB through the pipe
        print("thread", i)


threading.Thread(target=printer, name="printer", daemon=True).start()
children = []
for k in range(int(sys.argv[1]) if len(sys.argv) > 1 else 40):
    time.sleep(0.003)
    pid = os.fork()
    if pid == 0:
        print("child", k)
        sys.stdout.flush()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
os._exit(0)
