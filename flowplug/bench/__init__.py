"""``flowplug bench``: flowplug's transports side by side with the peers users know.

Rows: every chosen flowplug transport; tensorpack 0.11's ``MultiProcessRunner``,
``MultiProcessRunnerZMQ`` and ``MultiThreadRunner``; torch's ``DataLoader`` over an
``IterableDataset``; a bare pyzmq PUSH/PULL loop with pickle protocol 5 out-of-band frames;
and the physical limit, single-core ``np.copyto`` on the same payload size. Peers that are
not installed are reported as such, never faked.

Every row runs in a fresh subprocess (:mod:`flowplug.bench.child`) and is measured the same
way: startup (construct to first item), a warm-up, then the median items/s of ``repeats``
timed runs, the CPU time per item of all the row's processes, and the consumer's peak RSS.
With ``rounds`` > 1 the whole plan is measured that many times over and a row's items/s is
the median of its rounds' (ratios: the median of the per-round ratios).
"""

from .harness import BenchConfig, plan, run
from .payloads import PAYLOADS
from .report import Progress, plot, table

__all__ = ["PAYLOADS", "BenchConfig", "Progress", "plan", "plot", "run", "table"]
