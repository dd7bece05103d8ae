"""A real multi-process cluster: a Spark standalone master and two workers on loopback.

The test starts the master and workers with pyspark's own ``spark-class`` launcher, runs a
driver in a separate process (one SparkContext per process: the shared local session of the
other tests stays untouched), fits in every mode with executors in their own JVMs and Python
workers, and stops the cluster whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture
def standalone_cluster(tmp_path):
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    spark_class = spark_home / "bin" / "spark-class"
    env = dict(os.environ, SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    env["SPARK_WORKER_DIR"] = str(tmp_path / "work")
    port = _free_port()
    procs: list[subprocess.Popen] = []
    logs = []

    def launch(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        p = subprocess.Popen([str(spark_class), *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        master = launch("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(_free_port()))
        _wait_for_port(port, master, 90)
        url = f"spark://127.0.0.1:{port}"
        for i in range(2):
            launch(
                f"worker{i}",
                "org.apache.spark.deploy.worker.Worker",
                url,
                "--host", "127.0.0.1",
                "--cores", "1",
                "--memory", "1536m",
                "--webui-port", str(_free_port()),
                "--work-dir", str(tmp_path / f"work{i}"),
            )
        yield url, tmp_path
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        for log in logs:
            log.close()


def test_fit_every_mode_on_a_standalone_cluster(standalone_cluster):
    url, tmp = standalone_cluster
    out = tmp / "result.json"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "fit_on_cluster.py"), url, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["driver_pid"] not in result["executor_pids"]
    assert len(result["executor_pids"]) == 2
    for fit in result["fits"]:
        assert fit["steps"] == 2 * 30, fit
        assert fit["accuracy"] >= 0.9, fit
