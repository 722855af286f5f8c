"""Peak memory and time of chunked_kd_from_hidden against the naive full-logits loss.

Both variants compute forward KL between a student and a teacher LM head from their hidden states
and backpropagate it into the student's hidden states and head weight:

* naive: ``s = h_s @ W_s.T`` (with autograd), ``t = h_t @ W_t.T`` (no grad), ``forward_kl(s, t)``,
  ``backward()``: the full ``[tokens, vocab]`` logits and every intermediate of the divergence and
  its backward pass are alive at once.
* chunked: ``chunked_kd_from_hidden(h_s, W_s, h_t, W_t)``, ``backward()``: logits exist one chunk of
  tokens at a time and the student's gradients are computed in the forward pass.

Method. Each (variant, configuration) runs in a fresh subprocess, so one measurement cannot inherit
another's high-water mark. The inputs (float32, seeded) are allocated and a tiny warm-up op runs;
then the baseline is taken. On CUDA the peak is ``torch.cuda.max_memory_allocated()`` minus
``torch.cuda.memory_allocated()`` at the baseline. On CPU it is the process's peak resident set,
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, at the end minus its value at the baseline. PyTorch's
CPU allocator does not cache, and the workers run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that
glibc maps every block of 1 MiB or more on its own and returns it to the system when freed (no
dynamic threshold, no heap fragmentation): the high-water mark is that of the live tensors. The reported peak is therefore the extra
memory of one forward + backward step above the inputs, including the gradients ``.grad`` of the
student's hidden states and head. Time is the median over ``--repeats`` steps after ``--warmup``
steps. A configuration whose estimated peak exceeds ``--max-gib`` is skipped with a note (the
estimate scales the bytes per logit measured on the first configuration).

    python benchmarks/chunked_loss.py                        # 4096 tokens x {32768, 65536} vocab
    python benchmarks/chunked_loss.py --repeats 3 --vocabs 32768 65536 131072
    python benchmarks/chunked_loss.py --quick                # a smoke test of the script (seconds)

Writes ``chunked_loss.json`` (every number) and ``chunked_loss.md`` (the table) to ``--out``
(default ``benchmarks/results``). Run it with ``OMP_NUM_THREADS`` set to the cores you want to use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Targets reported against (not tuned to).
TARGET_MEMORY_RATIO = 0.25
TARGET_TIME_RATIO = 1.0
# Prior for the first configuration's naive peak, in bytes per logit (refined after measuring it).
PRIOR_BYTES_PER_LOGIT = {"naive": 48.0, "chunked": 48.0}


def _peak_bytes_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(spec: dict) -> dict:
    """One variant on one configuration, in this (fresh) process."""
    from distillery.functional import forward_kl
    from distillery.functional.chunked import chunked_kd_from_hidden

    device = torch.device(spec["device"])
    tokens, vocab, hidden = spec["tokens"], spec["vocab"], spec["hidden"]
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(tokens, hidden, generator=g).to(device).requires_grad_()
    w_s = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device).requires_grad_()
    h_t = torch.randn(tokens, hidden, generator=g).to(device)
    w_t = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)).to(device)

    def step_naive() -> torch.Tensor:
        s = h_s @ w_s.T
        with torch.no_grad():
            t = h_t @ w_t.T
        loss = forward_kl(s, t)
        loss.backward()
        return loss.detach()

    def step_chunked() -> torch.Tensor:
        loss = chunked_kd_from_hidden(h_s, w_s, h_t, w_t, chunk_size=spec["chunk_size"])
        loss.backward()
        return loss.detach()

    step = step_naive if spec["variant"] == "naive" else step_chunked
    # Load kernels and thread pools on a tiny problem before the baseline.
    small = torch.randn(4, 8, device=device, requires_grad=True)
    forward_kl(small, small.detach() * 2).backward()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _peak_bytes_now(device)

    times, loss = [], None
    for i in range(spec["warmup"] + spec["repeats"]):
        h_s.grad = w_s.grad = None
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak = _peak_bytes_now(device) - baseline
    return {
        **spec,
        "peak_mb": peak / 2**20,
        "time_s": statistics.median(times),
        "times_s": times,
        "loss": float(loss),
        "grad_w_norm": float(w_s.grad.norm()),
        "grad_h_norm": float(h_s.grad.norm()),
    }


def run_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    # Blocks of 1 MiB and more are mmapped and unmapped on free (no dynamic threshold, no heap
    # fragmentation), so ru_maxrss follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Chunked vs naive forward KL from hidden states ({meta['device']}, float32, hidden "
        f"{meta['hidden']}, chunk_size {meta['chunk_size']}, median of {meta['repeats']} steps after "
        f"{meta['warmup']} warm-up, {meta['threads']} thread(s)). Peak = extra memory of one forward + "
        f"backward step above the inputs ({meta['memory_method']}). Targets: memory ratio <= "
        f"{TARGET_MEMORY_RATIO}, time ratio <= {TARGET_TIME_RATIO}.",
        "",
        "| config | naive peak MB | chunked peak MB | ratio | naive time s | chunked time s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n, c = r.get("naive"), r.get("chunked")
        cells = [
            r["config"],
            f"{n['peak_mb']:.0f}" if n else "skipped",
            f"{c['peak_mb']:.0f}" if c else "skipped",
            _fmt_ratio(r.get("memory_ratio")),
            f"{n['time_s']:.2f}" if n else "skipped",
            f"{c['time_s']:.2f}" if c else "skipped",
            _fmt_ratio(r.get("time_ratio")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [r["note"] for r in rows if r.get("note")]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--chunk-size", type=int, default=None, help="default: the function's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-gib", type=float, default=8.0, help="skip a variant estimated to need more")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="a tiny configuration: checks the script")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and Markdown results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import inspect

    from distillery.functional.chunked import chunked_kd_from_hidden

    default_chunk = inspect.signature(chunked_kd_from_hidden).parameters["chunk_size"].default
    chunk_size = args.chunk_size or default_chunk
    if args.quick:
        args.tokens, args.hidden, args.vocabs, args.repeats, args.warmup = 256, 32, [2048], 1, 0
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    memory_method = (
        "torch.cuda.max_memory_allocated" if device == "cuda" else "ru_maxrss of a fresh subprocess"
    )
    meta = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
        "tokens": args.tokens,
        "hidden": args.hidden,
        "chunk_size": chunk_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_gib": args.max_gib,
        "memory_method": memory_method,
    }
    bytes_per_logit = dict(PRIOR_BYTES_PER_LOGIT)
    rows = []
    for vocab in args.vocabs:
        config = f"{args.tokens} tok x {vocab} vocab x {args.hidden} hid"
        row: dict = {"config": config, "vocab": vocab}
        notes = []
        for variant in ("naive", "chunked"):
            logits = args.tokens * vocab if variant == "naive" else min(args.tokens, chunk_size) * vocab
            estimate = bytes_per_logit[variant] * logits / 2**30
            if estimate > args.max_gib:
                notes.append(
                    f"{variant} skipped at {config}: estimated {estimate:.1f} GiB > {args.max_gib} GiB"
                )
                continue
            spec = {
                "variant": variant,
                "device": device,
                "tokens": args.tokens,
                "vocab": vocab,
                "hidden": args.hidden,
                "chunk_size": chunk_size,
                "repeats": args.repeats,
                "warmup": args.warmup,
            }
            result = run_in_subprocess(spec)
            row[variant] = result
            bytes_per_logit[variant] = max(1.0, result["peak_mb"] * 2**20 / logits)
            print(f"{config} {variant}: {result['peak_mb']:.0f} MB, {result['time_s']:.2f} s", flush=True)
        n, c = row.get("naive"), row.get("chunked")
        if n and c:
            row["memory_ratio"] = c["peak_mb"] / n["peak_mb"]
            row["time_ratio"] = c["time_s"] / n["time_s"]
            row["loss_rel_diff"] = abs(c["loss"] - n["loss"]) / abs(n["loss"])
            row["grad_w_norm_rel_diff"] = abs(c["grad_w_norm"] - n["grad_w_norm"]) / n["grad_w_norm"]
            if row["loss_rel_diff"] > 1e-4 or row["grad_w_norm_rel_diff"] > 1e-3:
                notes.append(f"MISMATCH at {config}: loss {c['loss']} vs {n['loss']}")
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, meta)
    (args.out / "chunked_loss.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "chunked_loss.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
