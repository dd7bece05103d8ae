"""The classic side of the Connect tests, run as a subprocess (a process that started a local
Connect server cannot hold a classic session of its own).

``python classic_side.py WORKDIR``: on a classic ``local[4]`` session (the driver-hosted shards take task slots of their own), fits the models that
``test_connect.py`` compares against (synchronous, from ``cases.initial_model()``; one ``.npy``
of the trained flat parameters per case), saves a fitted model to ``WORKDIR/classic_model``, and
loads the model the Connect test saved in ``WORKDIR/connect_model``, writing both models'
predictions on the shared data to ``.npy`` files.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(workdir: str) -> None:
    from pyspark.sql import SparkSession

    import cases
    from sparktorch import SparkTorchModel

    spark = (
        SparkSession.builder.master("local[4]").appName("sparktorch-classic-side")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    df = cases.frame(spark)
    for name, params in cases.SYNC_CASES.items():
        model = cases.estimator(**params).fit(df)
        np.save(os.path.join(workdir, f"classic_{name}.npy"), cases.flat(model))
        if name == "k1":
            model.write().overwrite().save(os.path.join(workdir, "classic_model"))
            np.save(os.path.join(workdir, "classic_model_pred.npy"), cases.predictions(model, df))
    loaded = SparkTorchModel.load(os.path.join(workdir, "connect_model"))
    np.save(os.path.join(workdir, "connect_model_pred_on_classic.npy"), cases.predictions(loaded, df))
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1])
