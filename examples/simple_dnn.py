"""The seed program: an MLP on MNIST, trained on local Spark through the parameter server.

Run it with ``make example`` (which prepares the venv, the Rust engine and the CSV files), or
directly: ``python examples/simple_dnn.py [--mode hogwild|async|synchronous] [--iters N]``.

The middle block is the program of sparktorch 0.2.0's README, unchanged but for the CSV path;
around it, this script converts the bundled MNIST files to CSV (first 8,000 rows to train, last
2,000 held out), prints the held-out accuracy and saves the fitted pipeline.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from prepare_mnist import prepare  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--mode", default="hogwild", choices=["hogwild", "async", "synchronous"])
parser.add_argument("--acquire-lock", default="true", choices=["true", "false"], help="hogwild mode: serialize updates")
parser.add_argument("--iters", type=int, default=50)
parser.add_argument("--out", default=str(HERE / "out" / "simple_dnn"), help="where the fitted pipeline is saved")
parser.add_argument("--verbose", type=int, default=1)
parser.add_argument("--seed", type=int, default=0, help="torch seed of the network's initial weights")
parser.add_argument("--remote", default=None, metavar="URL",
                    help="run on a Spark Connect session: 'local[4]' starts a local Connect server, or a server's sc://host:port")
parser.add_argument("--ps-dtype", default="float32", choices=["float32", "bfloat16"], help="parameter traffic on the wire")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

train_csv, test_csv = prepare()
# Reproducible runs: the seed program builds its network with torch's default random init.
import torch  # noqa: E402

torch.manual_seed(args.seed)

# ---- the seed program (sparktorch 0.2.0), unchanged but for the CSV path and the printed knobs
from sparktorch import serialize_torch_obj, SparkTorch  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from pyspark.ml.feature import VectorAssembler  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.ml.pipeline import Pipeline  # noqa: E402

if args.remote:  # Spark Connect: the parameter servers run inside the training stage
    spark = SparkSession.builder.appName("examples").remote(args.remote).getOrCreate()
else:
    spark = SparkSession.builder.appName("examples").master('local[4]').getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
df = spark.read.option("inferSchema", "true").csv(str(train_csv)).coalesce(4)
network = nn.Sequential(
    nn.Linear(784, 256),
    nn.ReLU(),
    nn.Linear(256, 256),
    nn.ReLU(),
    nn.Linear(256, 10),
    nn.Softmax(dim=1)
)
# Build the torch object
torch_obj = serialize_torch_obj(
    model=network,
    criterion=nn.CrossEntropyLoss(),
    optimizer=torch.optim.Adam,
    lr=0.0001
)
# Setup features
vector_assembler = VectorAssembler(inputCols=df.columns[1:785], outputCol='features')
# Create a SparkTorch Model with torch distributed. Barrier execution is on by default for this mode.
spark_model = SparkTorch(
    inputCol='features',
    labelCol='_c0',
    predictionCol='predictions',
    torchObj=torch_obj,
    iters=args.iters,
    partitions=4,
    verbose=args.verbose,
    useBarrier=True,
    mode=args.mode,
    acquireLock=args.acquire_lock == "true",
    psDtype=args.ps_dtype,
)
t0 = time.perf_counter()
# Can be used in a pipeline and saved.
p = Pipeline(stages=[vector_assembler, spark_model]).fit(df)
fit_s = time.perf_counter() - t0
p.write().overwrite().save(args.out)
# ---- end of the seed program

from pyspark.ml.evaluation import MulticlassClassificationEvaluator  # noqa: E402
from pyspark.ml.pipeline import PipelineModel  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

test = spark.read.option("inferSchema", "true").csv(str(test_csv))
loaded = PipelineModel.load(args.out)
predictions = loaded.transform(test).withColumn("label", F.col("_c0").cast("double"))
accuracy = MulticlassClassificationEvaluator(
    labelCol="label", predictionCol="predictions", metricName="accuracy"
).evaluate(predictions)
logging.getLogger("sparktorch.examples").info(
    "mode=%s acquireLock=%s iters=%d fit=%.1fs", args.mode, args.acquire_lock, args.iters, fit_s
)
# The example's result, on stdout for the reader (a script, not the library).
style = {"hogwild": "hogwild, lock-free" if args.acquire_lock == "false" else "hogwild + acquireLock (async with locking)"}.get(args.mode, args.mode)
print(f"held-out accuracy on {test.count()} MNIST rows: {accuracy:.4f} (fit {fit_s:.1f}s, {style}); pipeline saved to {args.out}")
spark.stop()
