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

PySpark itself is imported from its installed package rather than from the zip copy of it that
Spark puts first on the workers' ``PYTHONPATH``, where that zip belongs to the very same
installed package (``<pyspark>/python/lib/pyspark.zip``, as with ``pip install pyspark``): the
sources are the same files, but modules in a zip have no ``.pyc`` cache, so every daemon and
every worker compiled ``pyspark`` (and ``pyspark.worker``, some 4,000 lines) from source, and
Python 3.11 re-reads each zip's directory at every task (``importlib.invalidate_caches``). See
:func:`zip_copies_of_installed_packages`; with a separate Spark installation (``SPARK_HOME``
elsewhere) nothing changes.

Use it on a cluster with ``spark.python.daemon.module=sparktorch._daemon`` (a start-up
setting); in local mode a fit or a transform sets it on the running context when it is not set
(see :func:`sparktorch._driver.use_preloading_daemon`).
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import PathFinder


def _package_dir(name: str, path: list[str]) -> str | None:
    """The directory of package ``name`` as found on ``path`` (without importing it)."""
    spec = PathFinder.find_spec(name, path)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations), None)


def _py4j_version(package_dir: str) -> str | None:
    """``__version__`` of the py4j package in ``package_dir``, read from its ``version.py``."""
    try:
        with open(os.path.join(package_dir, "version.py"), encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("'\"")
    except OSError:
        return None
    return None


def zip_copies_of_installed_packages(path: list[str]) -> list[str]:
    """Entries of ``path`` that are zip copies of packages installed on ``path`` outside a zip.

    Two kinds qualify: ``pyspark.zip`` when it lies in the ``python/lib`` folder of the
    ``pyspark`` package that ``path`` holds outside any zip (the pip package ships that zip of
    its own sources), and ``py4j-<v>-src.zip`` beside it when the installed ``py4j`` is version
    ``<v>``. Anything else (a Spark installation of its own, other zips) is not returned.
    """
    plain = [p for p in path if not p.endswith(".zip")]
    pyspark_dir = _package_dir("pyspark", plain)
    if pyspark_dir is None:
        return []
    lib = os.path.realpath(os.path.join(pyspark_dir, "python", "lib"))
    py4j_dir = _package_dir("py4j", plain)
    found = []
    for entry in path:
        name = os.path.basename(entry)
        if not entry.endswith(".zip") or os.path.realpath(os.path.dirname(entry)) != lib:
            continue
        if name == "pyspark.zip":
            found.append(entry)
        elif name.startswith("py4j-") and name.endswith("-src.zip") and py4j_dir is not None:
            if _py4j_version(py4j_dir) == name[len("py4j-") : -len("-src.zip")]:
                found.append(entry)
    return found


def prefer_installed_packages() -> list[str]:
    """Drop :func:`zip_copies_of_installed_packages` from ``sys.path`` (and their cached
    importers) before anything is imported from them. Returns what was dropped."""
    if "pyspark" in sys.modules:  # too late: keep one source for the whole package
        return []
    dropped = zip_copies_of_installed_packages(sys.path)
    for entry in dropped:
        while entry in sys.path:
            sys.path.remove(entry)
        sys.path_importer_cache.pop(entry, None)
    return dropped


def main() -> None:
    """Prefer the installed PySpark, import numpy and torch, then run PySpark's daemon loop."""
    prefer_installed_packages()
    import numpy  # noqa: F401
    import torch  # noqa: F401
    from pyspark.daemon import manager

    manager()


if __name__ == "__main__":
    main()
