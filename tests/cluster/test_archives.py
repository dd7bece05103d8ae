"""Executors that get sparktorch only from a packed venv shipped with ``spark.archives``.

The packed venv holds a copy of the built package (``python/sparktorch`` with its compiled
engine, what the wheel installs). Its executors reach torch, numpy, pyarrow and PySpark through
``spark.executorEnv.PYTHONPATH`` set to this venv's site-packages (instead of the archive's own
3 GB copy of torch). A ``PYTHONPATH`` entry is not a site directory, so the dev venv's
``sparktorch-dev.pth`` does not take effect there: the executors can import sparktorch from the
archive only, and the test checks where they did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent.parent / "python" / "sparktorch"


def _packed_env(tmp: Path) -> Path:
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(subprocess.run(
        [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip())
    shutil.copytree(PACKAGE, site / "sparktorch", ignore=shutil.ignore_patterns("__pycache__"))
    probe = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import sparktorch, torch; print(sparktorch.__file__)"],
        check=True, capture_output=True, text=True, timeout=120, cwd=str(tmp),
        env=dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"]),
    )
    assert str(site) in probe.stdout, probe.stdout  # the copy, not the checkout
    archive = tmp / "env.tar.gz"
    venv_pack = Path(sys.executable).with_name("venv-pack")
    subprocess.run([str(venv_pack), "-p", str(env), "-o", str(archive), "-q"], check=True, timeout=300)
    shutil.rmtree(env)  # only the archive is left
    return archive


def test_fit_and_transform_with_sparktorch_from_an_archive(tmp_path):
    archive = _packed_env(tmp_path)
    out = tmp_path / "result.json"
    # As the docs say: the executors' Python is the archive's (PySpark reads PYSPARK_PYTHON when
    # the driver process creates its SparkContext; spark-submit sets it from spark.pyspark.python).
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON="./env/bin/python", PYSPARK_DRIVER_PYTHON=sys.executable)
    proc = subprocess.run(
        [sys.executable, str(HERE / "archive_fit.py"), str(archive), str(out), sysconfig.get_paths()["purelib"]],
        env=env, capture_output=True, text=True, timeout=500, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    checkout = str(PACKAGE.resolve())
    assert result["executors_imported"], result
    for module_file, python, cwd in result["executors_imported"]:
        assert not module_file.startswith(checkout), (module_file, "imported from the checkout, not the archive")
        assert module_file.startswith(os.path.realpath(cwd)), (module_file, cwd)
        assert "/env/" in module_file, module_file
    assert result["driver_imported"].startswith(checkout)
    assert result["steps"] == 2 * 30
    assert result["accuracy"] >= 0.9, result
