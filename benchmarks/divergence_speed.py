"""Closed-form-gradient divergences against the composed autograd path: time and saved memory.

For each logit divergence with a closed-form gradient (``distillery/functional/_fused.py``) and each
``[tokens, vocab]`` size: the median time of a forward + backward pass (float32, random logits with
a standard deviation of 2, the student's logits requiring a gradient, the teacher's not), and the
bytes autograd keeps for the backward pass (counted with ``torch.autograd.graph.saved_tensors_hooks``),
with the closed form and with the composed path (``log_softmax``/``exp``/``logaddexp`` recorded op by
op, what the function computes inside ``distillery.functional.composed_gradients()``).

    python benchmarks/divergence_speed.py                  # 512 and 4096 tokens x 32,768 vocab
    python benchmarks/divergence_speed.py --quick          # a smoke test of the script

Writes ``divergence_speed.json`` and ``divergence_speed.md`` to ``--out`` (default
``benchmarks/results``; ``--quick`` writes ``divergence_speed-quick.*``). Set ``OMP_NUM_THREADS`` to
the cores to use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from distillery import functional as DF

RESULTS = Path(__file__).resolve().parent / "results"
CALLS = {
    "forward_kl": lambda s, t: DF.forward_kl(s, t),
    "reverse_kl": lambda s, t: DF.reverse_kl(s, t),
    "jsd (beta 0.5)": lambda s, t: DF.generalized_jsd(s, t, beta=0.5),
    "skew_kl (alpha 0.1)": lambda s, t: DF.skew_kl(s, t, alpha=0.1),
    "skew_reverse_kl (alpha 0.1)": lambda s, t: DF.skew_reverse_kl(s, t, alpha=0.1),
}


def measure(call, s: torch.Tensor, t: torch.Tensor, fused: bool, repeats: int) -> dict:
    with contextlib.nullcontext() if fused else DF.composed_gradients():
        saved = [0]

        def pack(x):
            saved[0] += x.numel() * x.element_size()
            return x

        x = s.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = call(x, t)
        loss.backward()
        times = []
        for _ in range(repeats):
            x = s.clone().requires_grad_()
            start = time.perf_counter()
            call(x, t).backward()
            times.append(time.perf_counter() - start)
        return {
            "seconds": statistics.median(times),
            "saved_mb": saved[0] / 2**20,
            "value": float(loss.detach()),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="64 tokens x 1,024 vocab, 1 repeat")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.repeats = [64], 1024, 1

    rows = []
    for n in args.tokens:
        g = torch.Generator().manual_seed(0)
        s = 2 * torch.randn(n, args.vocab, generator=g)
        t = 2 * torch.randn(n, args.vocab, generator=g)
        for name, call in CALLS.items():
            composed = measure(call, s, t, False, args.repeats)
            fused = measure(call, s, t, True, args.repeats)
            if abs(fused["value"] - composed["value"]) > 1e-4 * max(1.0, abs(composed["value"])):
                raise RuntimeError(f"{name}: closed form {fused['value']} != composed {composed['value']}")
            row = {"divergence": name, "tokens": n, "vocab": args.vocab, "composed": composed, "fused": fused,
                   "speedup": composed["seconds"] / fused["seconds"],
                   "memory_ratio": fused["saved_mb"] / composed["saved_mb"]}  # fmt: skip
            rows.append(row)
            print(f"{n} x {args.vocab} {name}: composed {composed['seconds']:.3f}s / {composed['saved_mb']:.0f} MB, "
                  f"closed form {fused['seconds']:.3f}s / {fused['saved_mb']:.0f} MB", flush=True)  # fmt: skip

    lines = [
        f"Logit divergences, forward + backward, closed-form gradient vs composed autograd path (cpu, "
        f"float32, {torch.get_num_threads()} thread(s), median of {args.repeats}). Saved MB = what autograd "
        "keeps for the backward pass.",
        "",
        "| tokens x vocab | divergence | composed s | closed form s | speed-up | composed saved MB | "
        "closed form saved MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:,} x {r['vocab']:,} | {r['divergence']} | {r['composed']['seconds']:.3f} | "
            f"{r['fused']['seconds']:.3f} | {r['speedup']:.2f}x | {r['composed']['saved_mb']:.1f} | "
            f"{r['fused']['saved_mb']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "divergence_speed" + ("-quick" if args.quick else "")
    record = {"benchmark": "divergence_speed", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "repeats": args.repeats, "rows": rows,
              "command": "python benchmarks/divergence_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
