"""The no-overhead reference: the seed's training steps in one plain PyTorch process, no Spark.

    python benchmarks/plain_torch.py --iters 10,50 --out results.jsonl [--rep N]

Same network (``torch.manual_seed(0)``), loss (CrossEntropyLoss on the Softmax output, as the
seed), optimizer (Adam, lr 1e-4) and data (the 8,000 raw-pixel rows of ``mnist_train.csv``, cut
into the 4 partitions' worth of 2,000 rows). Two references per ``iters``:

- ``full-batch``: ``iters`` steps on all 8,000 rows -- what synchronous mode computes
  (the average of 4 equal-size partition gradients is the full-batch gradient);
- ``sequential-shards``: ``4 x iters`` steps, one 2,000-row shard after another -- the updates
  hogwild/async apply, without concurrency or staleness.

Training time excludes reading the CSV (timed separately as ``load_s``); accuracy is on the 2,000
held-out rows of ``mnist_test.csv``, also every few steps along the way for the time-to-accuracy
curve (``curve``: training seconds so far, accuracy, steps; the scoring itself is not timed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    TEST_CSV,
    TRAIN_CSV,
    accuracy,
    append_jsonl,
    load_csv,
    seed_network,
    setup_logging,
)

log = logging.getLogger("bench.plain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", default="50")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    setup_logging()
    import torch
    from torch import nn

    t0 = time.perf_counter()
    x, y = load_csv(TRAIN_CSV)
    x_test, y_test = load_csv(TEST_CSV)
    load_s = time.perf_counter() - t0
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    shards = list(zip(torch.chunk(xt, args.partitions), torch.chunk(yt, args.partitions)))
    for iters in [int(i) for i in args.iters.split(",")]:
        for variant in ("full-batch", "sequential-shards"):
            torch.manual_seed(0)
            net = seed_network()
            opt = torch.optim.Adam(net.parameters(), lr=0.0001)
            loss_fn = nn.CrossEntropyLoss()
            batches = [(xt, yt)] * iters if variant == "full-batch" else shards * iters
            every = max(1, len(batches) // 25)
            fit_s = 0.0
            curve = [[0.0, accuracy(net, x_test, y_test), 0]]
            for step, (bx, by) in enumerate(batches, 1):
                t1 = time.perf_counter()
                net.train()
                opt.zero_grad()
                loss_fn(net(bx), by).backward()
                opt.step()
                fit_s += time.perf_counter() - t1
                if step % every == 0 or step == len(batches):
                    curve.append([round(fit_s, 4), accuracy(net, x_test, y_test), step])
            acc = curve[-1][1]
            append_jsonl(args.out, {
                "side": "plain", "mode": variant, "iters": iters, "steps": len(batches), "rep": args.rep,
                "fit_s": fit_s, "accuracy": acc, "load_s": load_s, "curve": curve, "torch_threads": torch.get_num_threads(), "ok": True,
            })
            log.info("plain %s iters=%d: %.2fs accuracy %.4f", variant, iters, fit_s, acc)


if __name__ == "__main__":
    main()
