"""PySpark's Python worker daemon, with torch imported once before it forks the workers.

Spark starts one daemon per executor (``python -m <spark.python.daemon.module>``) and forks a
Python worker from it for each task. With ``pyspark.daemon`` every worker of a fit or a
``transform`` then imports torch on its own (seconds each, several workers sharing the cores)
and holds its own copy of torch's memory. Started as this module, the daemon imports torch and
numpy first: forked workers inherit them (the import is paid once per executor, and the pages
stay shared between the workers until written).

Only modules that start no thread at import are loaded before the fork (PySpark forks the
workers, and a fork copies only the forking thread): torch and numpy qualify, pyarrow and
pandas do not and are left to the workers, as PySpark does.

Use it on a cluster with ``spark.python.daemon.module=sparktorch._daemon`` (a start-up
setting); in local mode a fit or a transform sets it on the running context when it is not set
(see :func:`sparktorch._driver.use_preloading_daemon`).
"""

from __future__ import annotations

import numpy  # noqa: F401
import torch  # noqa: F401
from pyspark.daemon import manager

if __name__ == "__main__":
    manager()
