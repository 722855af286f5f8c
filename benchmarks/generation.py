"""Where the time of an on-policy distillation step goes, and what faster decoding would buy.

Times, on the models and batch of ``benchmarks/trl_comparison.py`` (a 4-layer teacher and a 2-layer
student Llama from :func:`distillery.models.causal_lm.build_causal_lm`, 16 arithmetic prompts, 16 sampled
tokens per row, float32):

* the parts of one on-policy step: the student's sampling (:func:`distillery.generation.sampling.
  generate_completions`, Hugging Face ``generate`` with its dynamic KV cache), the teacher's scoring
  forward pass (no grad), and the student's forward + backward pass with the JSD loss;
* the student's sampling alone under three decoders: Hugging Face ``generate`` with the dynamic
  cache (what distillery and TRL use), with a static cache, and with a static cache and
  ``torch.compile``-d decoding steps (``CompileConfig``; the one-off compile time is reported
  separately and excluded from the per-call time).

Each number is the median of ``--repeats`` calls after ``--warmup`` calls, in one process.

    python benchmarks/generation.py                 # CPU (or CUDA when present)
    python benchmarks/generation.py --no-compile     # skip the compiled decoder (needs a C++ compiler on CPU)

Writes ``generation.json`` and ``generation.md`` to ``--out`` (default ``benchmarks/results``). Set
``OMP_NUM_THREADS`` to the cores to use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER = {"hidden_size": 256, "layers": 4, "heads": 4}
STUDENT = {"hidden_size": 128, "layers": 2, "heads": 4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache decoder")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import transformers

    from distillery.data.text import ArithmeticTask, train_tokenizer
    from distillery.data.text.collate import special_ids
    from distillery.functional import generalized_jsd
    from distillery.generation.sampling import build_batch, generate_completions, pad_left
    from distillery.models.causal_lm import CausalLMConfig, build_causal_lm

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    tokenizer = train_tokenizer("", kind="byte", use_cache=False)
    pad_id, bos_id, eos_id = special_ids(tokenizer)
    torch.manual_seed(0)
    teacher = build_causal_lm(CausalLMConfig(**TEACHER), len(tokenizer), tokenizer).to(device).eval()
    student = build_causal_lm(CausalLMConfig(**STUDENT), len(tokenizer), tokenizer).to(device)
    problems = ArithmeticTask(digits=(1, 3), ops=("+",), seed=0).problems(args.batch_size)
    prompts = [[bos_id, *tokenizer(p.prompt, add_special_tokens=False)["input_ids"]] for p in problems]
    new = args.max_new_tokens

    def sample():
        return generate_completions(
            student, prompts, max_new_tokens=new, seed=0, eos_id=eos_id, pad_id=pad_id
        )

    completions = sample()
    batch = {k: v.to(device) for k, v in build_batch(prompts, completions, pad_id=pad_id).items()}

    def score():
        with torch.no_grad():
            return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    t_logits = score()[:, :-1]
    mask = batch["labels"][:, 1:] != -100

    def train_pass():
        student.zero_grad(set_to_none=True)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        generalized_jsd(logits, t_logits, beta=0.5, mask=mask).backward()

    r, w = args.repeats, args.warmup
    parts = {"student sampling (generate, dynamic cache)": _time(sample, r, w, device),
             "teacher scoring forward": _time(score, r, w, device),
             "student forward + backward (JSD)": _time(train_pass, r, w, device)}  # fmt: skip

    enc = pad_left(prompts, pad_id)
    enc = {k: v.to(device) for k, v in enc.items()}

    def decoder(cache: str | None, compile_it: bool):
        config = transformers.GenerationConfig(
            max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id,
            eos_token_id=eos_id, use_cache=True, cache_implementation=cache,
        )  # fmt: skip
        if compile_it:
            config.compile_config = transformers.CompileConfig(fullgraph=False)
            config.compile_config._compile_all_devices = True  # transformers compiles on CUDA only by default

        def run():
            with torch.no_grad():
                return student.generate(**enc, generation_config=config)

        return run

    student.eval()
    decoders = {}
    for name, cache, compile_it in (("dynamic cache", None, False), ("static cache", "static", False),
                                    ("static cache + torch.compile", "static", True)):  # fmt: skip
        if compile_it and args.no_compile:
            continue
        run = decoder(cache, compile_it)
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        decoders[name] = {"first_call_s": first, "median_s": _time(run, r, w, device)}
        print(
            f"{name}: first call {first:.2f}s, median {decoders[name]['median_s'] * 1000:.1f} ms", flush=True
        )

    step = sum(parts.values())
    lines = [
        f"One on-policy step's parts and the student's decoders ({device.type}, float32, "
        f"{torch.get_num_threads()} thread(s); batch {args.batch_size}, {new} new tokens; teacher {TEACHER}, "
        f"student {STUDENT}; median of {r} calls after {w} warm-up).",
        "",
        "| part of an on-policy step | ms | share |",
        "|---|---:|---:|",
        *[f"| {k} | {v * 1000:.1f} | {100 * v / step:.0f}% |" for k, v in parts.items()],
        "",
        "| student decoder | first call s | ms per call | vs dynamic cache |",
        "|---|---:|---:|---:|",
    ]
    base = decoders["dynamic cache"]["median_s"]
    for name, d in decoders.items():
        lines.append(
            f"| {name} | {d['first_call_s']:.2f} | {d['median_s'] * 1000:.1f} | {base / d['median_s']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "generation", "device": device.type, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "max_new_tokens": new, "teacher": TEACHER, "student": STUDENT,
              "repeats": r, "warmup": w, "parts_s": parts, "decoders": decoders,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "command": "python benchmarks/generation.py " + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    (args.out / "generation.json").write_text(json.dumps(record, indent=2))
    (args.out / "generation.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
