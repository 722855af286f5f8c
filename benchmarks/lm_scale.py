"""Language-model KD at real-size settings: memory and time of one step, and a teacher behind a server.

* ``memory``: one token-level KD step (0.5 CE + 0.5 forward KL) of a Llama student from a teacher with
  about 4x its parameters, in each setting: fp32; bf16 weights (``student.dtype`` / ``teacher.model.dtype``,
  GPU only: on a CPU bf16 matmuls are about 100x slower, so the CPU table leaves it out); gradient
  checkpointing; a LoRA student (r = 16 on the attention projections); the teacher offloaded to CPU memory
  (accelerate's ``cpu_offload``: on a CPU it only adds the copies, on a GPU it frees the teacher's memory).
  Each setting runs in a fresh subprocess (one cannot inherit another's high-water mark). Peak: on CUDA
  ``max_memory_allocated`` over the step minus what was allocated before it; on CPU the process's peak
  resident set at the end minus its resident set after the models and optimizer were built (glibc maps
  every block of 1 MiB or more on its own, ``MALLOC_MMAP_THRESHOLD_=1048576``, so the peak is that of the
  live tensors: activations, gradients, optimizer state). Time: the median step after ``--warmup`` steps.
* ``server``: samples/s of the same KD loop with the teacher local, and behind ``distillery serve-teacher``
  (another process on this machine, loopback) with and without prefetch, top-k = 20 (vLLM's default
  ``--max-logprobs``) and the sparse forward KL. Target: with prefetch, the server teacher's step time is
  at most 1.2x the local teacher's.
* ``fsdp``: the same KD step (fp32) under two CPU processes (gloo) with ``train.parallel`` ``ddp`` and
  ``fsdp``, beside one process: per process, the bytes of the parameters, gradients and optimizer state it
  holds (counted from its tensors: a shard under FSDP), and its peak resident set while the timed steps
  run (sampled every 2 ms by a thread; the models are built whole before sharding, so the high-water mark
  of the whole process would only show the build), and the median step time.

    python benchmarks/lm_scale.py                  # every part
    python benchmarks/lm_scale.py --part server
    python benchmarks/lm_scale.py --quick          # a smoke test of the script (seconds)

Writes ``benchmarks/results/lm_scale-<part>.json`` (every number) and ``.md`` (the table).
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
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SERVER_RATIO = 1.2
SETTINGS = {
    "fp32": {},
    "bf16 weights": {"dtype": "bfloat16"},
    "gradient checkpointing": {"checkpointing": True},
    "LoRA student (r=16)": {"lora": 16},
    "teacher offloaded to CPU": {"offload": True},
}


def sizes(quick: bool) -> dict[str, Any]:
    """Student and teacher shapes (the teacher ~4x the student's parameters), batch, sequence."""
    if quick:
        return {"vocab": 512, "student": (64, 2, 4), "teacher": (128, 2, 4), "batch": 4, "seq": 32}
    return {"vocab": 8192, "student": (256, 4, 8), "teacher": (512, 5, 8), "batch": 8, "seq": 256}


def _llama(hidden: int, layers: int, heads: int, vocab: int, dtype: str = "float32"):
    from distillery.models.causal_lm import CausalLMConfig, build_causal_lm

    cfg = CausalLMConfig(hidden_size=hidden, layers=layers, heads=heads, max_positions=1024, dtype=dtype)
    return build_causal_lm(cfg, vocab)


class RandomRows:
    """Token rows with the loop's ``get_batch`` protocol (ids drawn once from a seeded generator)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, indices):
        ids = self.ids[indices]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ---- memory: one setting per subprocess ----------------------------------------------------------------


def worker(setting: str, quick: bool, steps: int, warmup: int) -> dict[str, Any]:
    from distillery.losses import build_objective
    from distillery.losses.logit import CrossEntropyConfig, ForwardKLConfig
    from distillery.models.hf import HFCausalLMAdapter
    from distillery.models.peft import PeftConfig, apply_peft
    from distillery.models.placement import offload_to_cpu
    from distillery.teachers import FrozenTeacher
    from distillery.train import TrainConfig, fit, make_accelerator

    opts = SETTINGS[setting]
    s = sizes(quick)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    dtype = opts.get("dtype", "float32")
    student = _llama(*s["student"], s["vocab"], dtype)
    teacher = _llama(*s["teacher"], s["vocab"], dtype)
    params = {"student": sum(p.numel() for p in student.parameters()),
              "teacher": sum(p.numel() for p in teacher.parameters())}  # fmt: skip
    if opts.get("lora"):
        student = apply_peft(student, PeftConfig(r=opts["lora"], alpha=2.0 * opts["lora"]))
    params["trained"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    adapter = HFCausalLMAdapter()
    if opts.get("offload"):
        offload_to_cpu(teacher, device)
    else:
        teacher.to(device)
    objective = build_objective({"ce": CrossEntropyConfig(weight=0.5), "kd": ForwardKLConfig(weight=0.5)})
    rows = RandomRows(s["batch"] * (steps + warmup), s["seq"], s["vocab"])
    config = TrainConfig(steps=steps + warmup, batch_size=s["batch"], eval_every=0, log_every=10**6,
                         gradient_checkpointing=bool(opts.get("checkpointing")))  # fmt: skip
    times: list[float] = []
    marks: dict[str, int] = {}
    last = [time.perf_counter()]

    def on_step(step: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > warmup:
            times.append(now - last[0])
        last[0] = now

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        marks["base"] = torch.cuda.memory_allocated()
    else:
        marks["base"] = _rss()
    fit(student, rows, objective, config, teacher=FrozenTeacher(teacher, adapter, keep_dtype=True),
        adapter=adapter, progress=False, on_step=on_step, accelerator=make_accelerator())  # fmt: skip
    peak = (torch.cuda.max_memory_allocated() if cuda else _maxrss()) - marks["base"]
    return {
        "setting": setting,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "params": params,
        "peak_bytes": peak,
        "step_s": statistics.median(times),
        "step_times": times,
    }


def run_memory(args) -> dict[str, Any]:
    records = []
    cuda = torch.cuda.is_available()
    for setting in SETTINGS:
        if SETTINGS[setting].get("dtype") == "bfloat16" and not cuda:
            records.append(
                {"setting": setting, "skipped": "bf16 is measured on a GPU only (about 100x slower here)"}
            )
            continue
        cmd = [sys.executable, __file__, "--worker", setting, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--quick"] if args.quick else [])]  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{setting} failed:\n{done.stderr[-3000:]}")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  {setting}: peak {record['peak_bytes'] / 2**20:.0f} MiB, step {record['step_s'] * 1e3:.0f} ms"
        )
        records.append(record)
    return {"sizes": sizes(args.quick), "steps": args.steps, "warmup": args.warmup, "records": records}


def memory_table(record: dict[str, Any]) -> str:
    s = record["sizes"]
    first = next(r for r in record["records"] if "skipped" not in r)
    head = (
        f"student {first['params']['student'] / 1e6:.1f}M / teacher {first['params']['teacher'] / 1e6:.1f}M "
        f"parameters, {s['batch']} x {s['seq']} tokens, vocabulary {s['vocab']}, on {first['device']}"
    )
    rows = [head, "", "| setting | trained parameters | peak memory of a step (MiB) | vs fp32 | step (ms) | vs fp32 |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    base = first
    for r in record["records"]:
        if "skipped" in r:
            rows.append(f"| {r['setting']} | - | - | - | - | {r['skipped']} |")
            continue
        rows.append(
            f"| {r['setting']} | {r['params']['trained'] / 1e6:.2f}M | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['peak_bytes'] / base['peak_bytes']:.2f}x | {r['step_s'] * 1e3:.0f} | {r['step_s'] / base['step_s']:.2f}x |"
        )
    return "\n".join(rows)


# ---- FSDP vs DDP: two processes ------------------------------------------------------------------------------


class _PeakSampler:
    """The highest resident set of this process while running (sampled by a thread)."""

    def __init__(self, every_s: float = 0.002) -> None:
        import threading

        self.every_s, self.peak, self._on = every_s, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self._on:
                self.peak = max(self.peak, _rss())

    def start(self) -> None:
        self.peak, self._on = _rss(), True

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def fsdp_worker(parallel: str, quick: bool, steps: int, warmup: int) -> dict[str, Any] | None:
    from distillery.losses import build_objective
    from distillery.losses.logit import CrossEntropyConfig, ForwardKLConfig
    from distillery.models.hf import HFCausalLMAdapter
    from distillery.teachers import FrozenTeacher
    from distillery.train import TrainConfig, fit, make_accelerator
    from distillery.train.fsdp import _local

    acc = make_accelerator()
    s = sizes(quick)
    torch.manual_seed(0)
    student = _llama(*s["student"], s["vocab"])
    teacher = FrozenTeacher(_llama(*s["teacher"], s["vocab"]), HFCausalLMAdapter())
    params = {"student": sum(p.numel() for p in student.parameters()),
              "teacher": sum(p.numel() for p in teacher.module.parameters())}  # fmt: skip
    objective = build_objective({"ce": CrossEntropyConfig(weight=0.5), "kd": ForwardKLConfig(weight=0.5)})
    rows = RandomRows(s["batch"] * (steps + warmup), s["seq"], s["vocab"])
    config = TrainConfig(steps=steps + warmup, batch_size=s["batch"], eval_every=0, log_every=10**6,
                         parallel=parallel)  # fmt: skip
    sampler, times, held, last = _PeakSampler(), [], {}, [time.perf_counter()]

    def nbytes(tensors) -> int:
        return sum(_local(t).numel() * t.element_size() for t in tensors if t is not None)

    def on_step(step: int) -> None:
        now = time.perf_counter()
        if step > warmup:
            times.append(now - last[0])
        if step == warmup:
            sampler.start()
        if step == steps + warmup:  # what this process holds, counted from its (local) tensors
            held["student_params"] = nbytes(student.parameters())  # sharded in place under fsdp
            held["teacher_params"] = nbytes(teacher.module.parameters())
            held["optimizer_state"] = (
                2 * held["student_params"]
            )  # AdamW: exp_avg and exp_avg_sq per parameter
        last[0] = now

    before = _rss()  # the models built whole, before fit shards them
    fit(student, rows, objective, config, teacher=teacher, adapter=HFCausalLMAdapter(), progress=False,
        on_step=on_step, accelerator=acc)  # fmt: skip
    peak = sampler.close()
    mine = {
        "rank": acc.process_index,
        "rss_before": before,
        "peak_rss": peak,
        "step_s": statistics.median(times),
        **held,
    }
    gathered = [mine]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([mine])
    if not acc.is_main_process:
        return None
    return {"parallel": parallel, "processes": acc.num_processes, "params": params, "ranks": gathered,
            "device": platform.processor() or "cpu"}  # fmt: skip


def run_fsdp(args) -> dict[str, Any]:
    records = []
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), *(["--quick"] if args.quick else [])]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root), env.get("PYTHONPATH", "")])
    runs = [("one process", [sys.executable, __file__, "--fsdp-worker", "ddp", *common], {})]
    for parallel in ("ddp", "fsdp"):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "0", __file__, "--fsdp-worker", parallel, *common]  # fmt: skip
        runs.append((f"2 processes, {parallel}", launch, {"OMP_NUM_THREADS": "1"}))
    for label, cmd, extra in runs:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra})
        if done.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        line = next(x for x in reversed(done.stdout.strip().splitlines()) if x.startswith("{"))
        record = {"label": label, **json.loads(line)}
        rank0 = record["ranks"][0]
        print(
            f"  {label}: peak RSS {rank0['peak_rss'] / 2**20:.0f} MiB per process, step {rank0['step_s'] * 1e3:.0f} ms"
        )
        records.append(record)
    return {"sizes": sizes(args.quick), "steps": args.steps, "warmup": args.warmup, "records": records}


def fsdp_table(record: dict[str, Any]) -> str:
    s, first = record["sizes"], record["records"][0]
    head = (
        f"student {first['params']['student'] / 1e6:.1f}M / teacher {first['params']['teacher'] / 1e6:.1f}M "
        f"parameters (fp32, AdamW), {s['batch']} x {s['seq']} tokens per step over all processes, vocabulary "
        f"{s['vocab']}, on {first['device']}; per process (the mean of the processes)"
    )
    rows = [head, "", "| run | student parameters held (MiB) | teacher parameters held (MiB) | + gradients + "
            "AdamW state (MiB) | resident set before training, models whole (MiB) | peak resident set in training (MiB) | step (ms) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in record["records"]:
        ranks = r["ranks"]

        def mean(key: str, ranks: list[dict[str, Any]] = ranks) -> float:
            return statistics.mean(x[key] for x in ranks)

        student, teacher = mean("student_params"), mean("teacher_params")
        rows.append(
            f"| {r['label']} | {student / 2**20:.1f} | {teacher / 2**20:.1f} | {(student * 2 + mean('optimizer_state')) / 2**20:.1f} | "
            f"{mean('rss_before') / 2**20:.0f} | {mean('peak_rss') / 2**20:.0f} | {mean('step_s') * 1e3:.0f} |"
        )
    return "\n".join(rows)


# ---- server vs local teacher ------------------------------------------------------------------------------


def run_server(args) -> dict[str, Any]:
    from distillery.data.text.tokenizer import train_tokenizer
    from distillery.losses import build_objective
    from distillery.losses.logit import CrossEntropyConfig, ForwardKLConfig
    from distillery.models.hf import HFCausalLMAdapter
    from distillery.serving import free_port, launch
    from distillery.teachers import FrozenTeacher, ServerTeacher, TeacherClient
    from distillery.train import TrainConfig, fit

    s = sizes(args.quick)
    s = {**s, "seq": min(s["seq"], 128)}
    from distillery.data.text.corpus import load_austen

    text = load_austen()
    tokenizer = train_tokenizer([text[: 200_000 if args.quick else 2_000_000]], vocab_size=s["vocab"], kind="bpe",
                                use_cache=False)  # fmt: skip
    vocab = len(tokenizer)
    torch.manual_seed(1)
    teacher = _llama(*s["teacher"], vocab)
    folder = Path(tempfile.mkdtemp())
    teacher.save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    steps, warmup = args.steps, args.warmup
    rows = RandomRows(s["batch"] * (steps + warmup), s["seq"], vocab)
    adapter = HFCausalLMAdapter()
    out: dict[str, Any] = {
        "sizes": {**s, "vocab": vocab},
        "steps": steps,
        "warmup": warmup,
        "top_k": 20,
        "arms": {},
    }

    def timed(label: str, make_teacher) -> None:
        torch.manual_seed(0)
        student = _llama(*s["student"], vocab)
        terms = {"ce": CrossEntropyConfig(weight=0.5), "kd": ForwardKLConfig(weight=0.5)}
        objective = build_objective(terms if make_teacher is not None else {"ce": CrossEntropyConfig()})
        times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int) -> None:
            now = time.perf_counter()
            if step > warmup:
                times.append(now - last[0])
            last[0] = now

        teacher_obj = None if make_teacher is None else make_teacher()
        fit(student, rows, objective, TrainConfig(steps=steps + warmup, batch_size=s["batch"], eval_every=0,
            log_every=10**6), teacher=teacher_obj, adapter=adapter, progress=False, on_step=on_step)  # fmt: skip
        step = statistics.median(times)
        out["arms"][label] = {"step_s": step, "samples_per_s": s["batch"] / step, "step_times": times,
                              **({"server": teacher_obj.metrics()} if hasattr(teacher_obj, "metrics") else {})}  # fmt: skip
        print(f"  {label}: {s['batch'] / step:.1f} samples/s ({step * 1e3:.0f} ms/step)")

    threads = torch.get_num_threads()
    timed(f"local teacher (dense), {threads} threads", lambda: FrozenTeacher(teacher, adapter))
    # references: the student's own step (cross-entropy, no teacher) with all the cores and with the trainer's
    # share when the cores are split: the least a teacher anywhere can cost the trainer
    timed(f"no teacher (CE only), {threads} threads", None)
    torch.set_num_threads(max(1, threads - 1))
    timed(f"no teacher (CE only), {max(1, threads - 1)} thread(s)", None)
    torch.set_num_threads(threads)
    # the server and the trainer share this machine's cores: first each with all of them (they contend),
    # then the cores split between them (1 + the rest), as with a server on its own hardware
    for split in (False, True):
        port = free_port()
        server = launch(folder / "teacher", port, threads=1 if split else None)
        if split:
            torch.set_num_threads(max(1, threads - 1))
        how = (
            f"server 1 thread + trainer {max(1, threads - 1)}"
            if split
            else f"server and trainer {threads} threads each"
        )
        try:
            for prefetch in (True, False):

                def make(prefetch=prefetch, port=port):
                    client = TeacherClient(
                        f"http://127.0.0.1:{port}", top_k=20, vocab_size=vocab, batch_rows=4
                    )
                    return ServerTeacher(client, prefetch=prefetch)

                timed(f"{how}, top-20, {'prefetch' if prefetch else 'no prefetch'}", make)
        finally:
            server.terminate()
            server.wait(10)
            torch.set_num_threads(threads)
    return out


def server_table(record: dict[str, Any]) -> str:
    arms = record["arms"]
    local = next(a for label, a in arms.items() if label.startswith("local"))["step_s"]
    s = record["sizes"]
    rows = [f"{s['batch']} x {s['seq']} tokens per step, vocabulary {s['vocab']}; the server on the same machine (loopback)",
            "", "| teacher | samples/s | step (ms) | vs local | target |", "|---|---|---|---|---|"]  # fmt: skip
    for label, a in arms.items():
        ratio = a["step_s"] / local
        target = "-" if "prefetch" not in label or "no prefetch" in label or "each" in label else (
            f"<= {TARGET_SERVER_RATIO}x: {'met' if ratio <= TARGET_SERVER_RATIO else 'missed'}")  # fmt: skip
        rows.append(
            f"| {label} | {a['samples_per_s']:.1f} | {a['step_s'] * 1e3:.0f} | {ratio:.2f}x | {target} |"
        )
    return "\n".join(rows)


PARTS = {
    "memory": (run_memory, memory_table),
    "server": (run_server, server_table),
    "fsdp": (run_fsdp, fsdp_table),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", *PARTS], default="all")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the numbers")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.fsdp_worker:
        record = fsdp_worker(args.fsdp_worker, args.quick, args.steps, args.warmup)
        if record is not None:
            print(json.dumps(record))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, args.steps, args.warmup)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for part in PARTS if args.part == "all" else [args.part]:
        run, table = PARTS[part]
        t0 = time.perf_counter()
        record = {"benchmark": "lm_scale", "part": part, "quick": args.quick, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), **run(args)}  # fmt: skip
        record["seconds"] = time.perf_counter() - t0
        text = table(record)
        stem = f"lm_scale-{part}" + ("-quick" if args.quick else "")
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
        (args.out / f"{stem}.md").write_text(text + "\n")
        print(text)
        print(f"{part}: {record['seconds']:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
