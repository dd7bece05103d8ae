"""Write the reference trajectories the Rust parity test replays (run from the repo root):

    .venv/bin/python tests/parity/gen_fixtures.py

For every case of ``cases.py``: one flat float32 parameter of ``LEN`` elements, ``STEPS`` random
gradients, torch.optim's (single-tensor, ``foreach=False``) parameters after every step, and its
final state. Floats are written as the hex of their bits, so nothing is lost in printing.
Output: ``crates/sparktorch-optim/tests/fixtures/trajectories.txt``.
"""

from __future__ import annotations

import pathlib
import struct
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from cases import CASES, gradient_scale  # noqa: E402

LEN = 20
STEPS = 50
OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/sparktorch-optim/tests/fixtures/trajectories.txt"


def hexes(t: torch.Tensor) -> str:
    return " ".join(f"{struct.unpack('<I', struct.pack('<f', v))[0]:08x}" for v in t.flatten().tolist())


def hyper(kwargs: dict) -> str:
    out = []
    for k, v in kwargs.items():
        if isinstance(v, bool):
            out.append(f"{k}=b:{int(v)}")
        elif isinstance(v, tuple):
            out.append(f"{k}=p:{float(v[0])!r}:{float(v[1])!r}")
        else:
            out.append(f"{k}=f:{float(v)!r}")
    return " ".join(out)


def main() -> None:
    lines: list[str] = []
    for i, (case, name, kwargs) in enumerate(CASES):
        g = torch.Generator().manual_seed(1000 + i)
        p = torch.nn.Parameter(torch.randn(LEN, generator=g))
        opt = getattr(torch.optim, name)([p], foreach=False, **kwargs)
        lines += [f"case {case}", f"optimizer {name}", f"hyper {hyper(kwargs)}", f"len {LEN}"]
        lines.append(f"init {hexes(p.detach())}")
        for step in range(STEPS):
            grad = torch.randn(LEN, generator=g) * gradient_scale(step)
            grad[step % LEN] = 0.0
            p.grad = grad.clone()
            opt.step()
            lines.append(f"grad {hexes(grad)}")
            lines.append(f"param {hexes(p.detach())}")
        st = opt.state[p]
        lines.append(f"step {int(st['step'].item()) if 'step' in st else STEPS}")
        for k, v in st.items():
            if k == "step" or v is None:
                continue
            if v.dim() == 0:
                lines.append(f"scalar {k} {hexes(v)}")
            else:
                lines.append(f"buffer {k} {hexes(v)}")
        lines.append("end")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(CASES)} cases to {OUT}")  # a script, not the library


if __name__ == "__main__":
    main()
