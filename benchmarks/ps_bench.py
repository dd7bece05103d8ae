"""Parameter-server round trips from Python clients: ours vs sparktorch 0.2.0.

Run by ``run_all.py`` under one venv at a time:

    python benchmarks/ps_bench.py --side ours|upstream --sizes 0.27M,5M --clients 1,2,4 \
        --ops pull,push --seconds 3 --out results.jsonl

For each model size a fresh server starts in this process (loopback only); ``max(clients)``
client processes (spawned once, so their start-up is not measured) then run each cell: all
clients of the cell start together and repeat one operation for ``--seconds``.

- ours: ``sparktorch._native.ParameterServer`` (mode ``async``: updates applied whole, one at a
  time, the counterpart of upstream's default ``acquireLock=True``) and ``Client.pull`` /
  ``Client.push`` into / from preallocated float32 buffers.
- upstream: its ``sparktorch.server.Server`` (Flask, forked process, ``acquire_lock=True``), driven
  with its own worker functions ``hogwild.get_state_dict`` (GET /parameters + ``dill.loads``) and
  ``hogwild.put_deltas_to_server`` (``dill.dumps`` + POST /update; the server unpickles and runs the
  optimizer step under its lock).

Both use Adam (lr 1e-4) on the server, so a push pays for one optimizer step over the whole model.
Throughput is round trips per second summed over the clients; MB/s counts the model's float32
payload (4 bytes x parameters) per round trip, not protocol overhead.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PS_MODELS, append_jsonl, free_port, mlp, setup_logging

log = logging.getLogger("bench.ps")


# ---------------------------------------------------------------------------------- clients
_NEXT_STEP: dict[tuple[str, int], int] = {}  # (host, port) -> next step of this worker


class _OursClient:
    """Steps continue across cells on the same server: a (worker, attempt, step) already applied
    is acknowledged as a duplicate without an update, which would flatter the push numbers."""

    def __init__(self, info: dict[str, Any], wid: int) -> None:
        import numpy as np
        from sparktorch import _native

        self.client = _native.Client(info["host"], info["port"], info["secret"], worker=wid, timeout_s=120.0)
        n = info["num_params"]
        self.out = np.empty(n, dtype=np.float32)
        self.grads = (np.random.default_rng(wid).standard_normal(n) * 1e-3).astype(np.float32)
        self.key = (info["host"], info["port"])
        self.step = _NEXT_STEP.get(self.key, 0)

    def pull(self) -> None:
        self.client.pull(self.out)

    def push(self) -> None:
        self.client.push(self.grads, batch_size=1, loss=0.0, step=self.step)
        self.step += 1

    def close(self) -> None:
        _NEXT_STEP[self.key] = self.step
        self.client.close()


class _UpstreamClient:
    def __init__(self, info: dict[str, Any], wid: int) -> None:
        import torch
        from sparktorch import hogwild

        self.hogwild = hogwild
        self.url = info["url"]
        gen = torch.Generator().manual_seed(wid)
        self.grads = [torch.randn(shape, generator=gen) * 1e-3 for shape in info["shapes"]]

    def pull(self) -> None:
        self.hogwild.get_state_dict(self.url)

    def push(self) -> None:
        self.hogwild.put_deltas_to_server(self.grads, self.url)

    def close(self) -> None:
        pass


def client_main(side: str, wid: int, conn: Any) -> None:
    """A client process: connect / warm / go / close commands from the parent over a pipe."""
    logging.basicConfig(level=logging.WARNING)
    client: Any = None
    op = "pull"
    while True:
        msg = conn.recv()
        kind = msg[0]
        try:
            if kind == "connect":
                client = (_OursClient if side == "ours" else _UpstreamClient)(msg[1], wid)
                conn.send(("ok", None))
            elif kind == "warm":
                op = msg[1]
                getattr(client, op)()
                conn.send(("ok", None))
            elif kind == "go":
                start_at, seconds = msg[1], msg[2]
                fn = getattr(client, op)
                while time.time() < start_at:
                    time.sleep(0.0005)
                t0 = time.perf_counter()
                end = t0 + seconds
                lat: list[float] = []
                while True:
                    t = time.perf_counter()
                    if t >= end and lat:
                        break
                    fn()
                    lat.append(time.perf_counter() - t)
                elapsed = time.perf_counter() - t0
                conn.send(("ok", {"ops": len(lat), "elapsed_s": elapsed, "lat_ms_median": 1e3 * statistics.median(lat)}))
            elif kind == "close":
                if client is not None:
                    client.close()
                client = None
                conn.send(("ok", None))
            elif kind == "quit":
                conn.send(("ok", None))
                return
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ---------------------------------------------------------------------------------- servers
class _OursServer:
    def __init__(self, model: Any) -> None:
        import numpy as np
        import torch
        from sparktorch import _native

        try:
            from sparktorch._optim import resolve_optimizer

            opt_name, hyper = resolve_optimizer(torch.optim.Adam, {"lr": 1e-4})
        except ImportError:
            opt_name, hyper = "adam", {"lr": 1e-4}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        flat = np.concatenate([p.detach().reshape(-1).numpy() for _, p in named]).astype(np.float32)
        layout = [(n, list(p.shape)) for n, p in named]
        secret = os.urandom(32)
        self.server = _native.ParameterServer(
            flat, layout, opt_name, hyper, secret=secret, mode="async", host="127.0.0.1", port=0, num_workers=4
        )
        host, port = self.server.address
        self.info = {"host": host, "port": port, "secret": secret, "num_params": int(flat.size)}
        self.versions_before = 0

    def updates(self) -> Any:
        st = self.server.stats()
        return {"version": int(self.server.version()), "updates": st.get("updates"), "duplicates": st.get("duplicates")}

    def stop(self) -> None:
        self.server.stop()


class _UpstreamServer:
    def __init__(self, model: Any) -> None:
        import requests
        import torch
        import upstream_compat as uc
        from sparktorch import serialize_torch_obj
        from sparktorch.server import Server
        from torch import nn

        uc.apply_loopback()
        obj = uc.serialize(serialize_torch_obj, model=model, criterion=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam, lr=1e-4)
        port = free_port()
        self.server = Server(torch_obj=obj, port=port, acquire_lock=True)
        self.server.start_server()  # forks the Flask process
        url = self.server.master_url
        deadline = time.time() + 60
        while True:
            try:
                if requests.get(f"http://{url}/", timeout=2).text == "sparktorch":
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"upstream server at {url} did not answer within 60 s")
            time.sleep(0.1)
        self.url = url
        self.info = {"url": url, "shapes": [list(p.shape) for p in model.parameters()]}
        self.first = self._first_param()

    def _first_param(self) -> Any:
        from sparktorch.hogwild import get_state_dict

        sd = get_state_dict(self.url)
        return next(iter(sd.values())).clone()

    def updates(self) -> int:
        # Upstream keeps no counter: report whether pushes changed the parameters at all.
        return int(not bool((self._first_param() == self.first).all()))

    def stop(self) -> None:
        self.server.stop_server()


# ---------------------------------------------------------------------------------- driver
def _ask(conns: list[Any], msg: tuple) -> list[Any]:
    for c in conns:
        c.send(msg)
    replies = []
    for c in conns:
        if not c.poll(300):
            raise TimeoutError(f"client gave no answer to {msg[0]!r} within 300 s")
        status, value = c.recv()
        if status != "ok":
            raise RuntimeError(f"client failed on {msg[0]!r}: {value}")
        replies.append(value)
    return replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["ours", "upstream"], required=True)
    ap.add_argument("--sizes", default="0.27M,5M,25M")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--ops", default="pull,push")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    setup_logging()
    import torch

    sizes = args.sizes.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    ops = args.ops.split(",")
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for wid in range(max(clients)):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=client_main, args=(args.side, wid, child), daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)
    extra: dict[str, Any] = {}
    try:
        for size in sizes:
            torch.manual_seed(0)
            model = mlp(PS_MODELS[size])
            n = sum(p.numel() for p in model.parameters())
            t0 = time.perf_counter()
            server = _OursServer(model) if args.side == "ours" else _UpstreamServer(model)
            start_s = time.perf_counter() - t0
            if args.side == "upstream":
                import upstream_compat as uc

                extra = {"upstream_compat": uc.report()}
            try:
                for c in clients:
                    active = conns[:c]
                    _ask(active, ("connect", server.info))
                    for op in ops:
                        _ask(active, ("warm", op))
                        res = _ask(active, ("go", time.time() + 0.3, args.seconds))
                        total_ops = sum(r["ops"] for r in res)
                        rate = sum(r["ops"] / r["elapsed_s"] for r in res)
                        rec = {
                            "side": args.side, "size": size, "num_params": n, "clients": c, "op": op,
                            "rep": args.rep, "seconds": args.seconds, "ops": total_ops,
                            "ops_per_s": rate, "mb_per_s": rate * 4 * n / 1e6,
                            "lat_ms_median": statistics.median(r["lat_ms_median"] for r in res),
                            "server_start_s": start_s, **extra,
                        }
                        append_jsonl(args.out, rec)
                        log.info("%s %s c=%d %s: %.1f ops/s %.0f MB/s", args.side, size, c, op, rate, rec["mb_per_s"])
                    _ask(active, ("close",))
                applied = server.updates()
                append_jsonl(args.out, {"side": args.side, "size": size, "rep": args.rep, "check": "pushes_applied", "value": applied})
            finally:
                server.stop()
    finally:
        for c in conns:
            try:
                c.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


if __name__ == "__main__":
    main()
