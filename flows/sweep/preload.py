"""The forkserver's preload: imported once, in the process that a sweep's trial workers are forked from.

Never imported anywhere else (it changes the importing process's SIGINT handling).
A fresh worker process would spend seconds importing Prefect, MLflow's client,
matplotlib and cnncore, and reading matplotlib's fonts, before its first
trial (4-6 s on an idle 2-core machine, 20-70 s under load); done once here, while the
sweep's own process opens its runs, each forked worker starts with all of it in memory
(copy-on-write) and exits without the interpreter's slow teardown (os._exit).

Nothing that holds a connection or a thread is made here: a forked child must not share
the parent's sqlite connections or locks. So MLflow's client modules are imported, not a
client made, and each worker opens its own store (worker.warm_up).
"""

import signal

# First of all: SIGINT ignored, then unblocked. flows.forkserver.start_forkserver blocks SIGINT while it starts
# this process (a blocked signal stays blocked across exec), so a Ctrl-C before this line waits as pending,
# and setting SIG_IGN discards it. The workers forked from here start with SIGINT ignored.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

import atexit  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402

from flows import tracking  # noqa: E402
from flows.config import DataSpec  # noqa: E402
from flows.figures import learning_curves_figure  # noqa: E402
from flows.load_data import load_data_once  # noqa: E402
from flows.sweep import worker  # noqa: E402, F401  (the workers' own code)

# The forkserver ends when the sweep's process and its workers are gone; with all of the above imported, the
# interpreter's teardown would keep it alive (and in the sweep's process group) for seconds more.
atexit.register(os._exit, 0)

try:
    tracking.import_client()
    # The default dataset (the bundled digits, small; scikit-learn's split, read back from cnncore.split_cache
    # once a process has made it) stays in the memo, which the forked workers share; the first figure reads
    # matplotlib's fonts.
    load_data_once(DataSpec())
    learning_curves_figure([1.0], [0], [0.0], [0.0], "warm-up").savefig(io.BytesIO(), format="png")
except Exception:  # a warm-up that fails costs each worker the time, never the sweep: warm_up does it again
    pass
