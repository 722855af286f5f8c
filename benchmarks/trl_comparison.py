"""On-policy distillation (GKD) throughput: distillery's ``fit`` against TRL's ``GKDTrainer``.

Both sides train the same student against the same teacher with the same settings:

* models: a tiny Llama teacher and a narrower Llama student from
  :func:`distillery.models.causal_lm.build_causal_lm`, built from the same seed (identical initial weights on
  both sides), float32, on the CPU (or CUDA with ``--device cuda``; ``auto`` picks CUDA when present);
* data: arithmetic prompt/response pairs (:class:`distillery.data.text.ArithmeticTask`) with the byte
  tokenizer, laid out as ``<bos> prompt response <eos>`` with the prompt masked;
* method: with probability lambda a step's responses are replaced by the student's samples
  (``max_new_tokens``, temperature 1, no top-k/top-p), the teacher scores every response token and
  the student minimises the generalized JSD(beta) token by token, averaged over the valid tokens;
* optimisation: ``batch_size`` sequences per optimizer step (one process, no accumulation), AdamW
  (betas 0.9/0.999, eps 1e-8, no weight decay) at a constant learning rate, no gradient clipping, the
  same number of steps.

The two sides:

* distillery: :func:`distillery.train.fit` with :class:`distillery.generation.OnPolicyBatches`
  as ``batch_transform``, ``Objective({"jsd": JSDLoss(beta)})``, a :class:`FrozenTeacher` and the
  :class:`HFCausalLMAdapter`, on a pre-tokenized :class:`TokenDataset`; twice: with the loss on the
  full logits, and with the chunked loss from hidden states (``HFCausalLMAdapter(hidden_states=True)``,
  what ``chunked_loss.enabled: true`` does in a run).

Vocabulary: ``--vocab-sizes byte 32768`` (the default) runs everything with the byte tokenizer's 259
output rows, then with 32,768 (the byte ids plus unused rows: the output-layer, sampling and loss cost
of a 32k vocabulary, as in Llama 2 or Mistral). Sampled ids are used as ids, never decoded.
* TRL: ``trl.experimental.gkd.GKDTrainer`` -- TRL's trainer for GKD with a lambda (``lmbda``):
  ``trl.DistillationTrainer`` is always fully on-policy (no lambda), so it cannot run lambda = 0.5.
  The data is a ``datasets.Dataset`` of chat ``messages`` (user prompt, assistant response) that
  TRL's ``DataCollatorForChatML`` tokenizes every batch with the same byte tokenizer, given a chat
  template that renders ``<bos>`` prompt response ``<eos>``; the worker checks that the token ids
  TRL trains on equal distillery's. TRL's defaults that would make the runs unequal are overridden
  and recorded: ``gradient_checkpointing=False`` (TRL's default True also disables the KV cache in
  generation), ``bf16=False`` (TRL's default True), ``max_grad_norm=0`` (transformers clips at 1 by
  default), ``optim="adamw_torch"``, ``weight_decay=0``, ``lr_scheduler_type="constant"``,
  ``temperature=1`` (GKDConfig's default sampling temperature is 0.9); logging, evaluation, saving
  and reporting are off, ``dataloader_num_workers=0``.

Measurement. Each (framework, lambda, repeat) runs in a fresh subprocess. ``--warmup`` steps run
first, then ``--steps`` measured steps; a step's time is taken at the end of each optimizer step
(distillery's ``on_step`` hook, a TRL ``TrainerCallback.on_step_end``; CUDA is synchronised first),
so both include fetching the batch, sampling, the teacher and student passes and the update.
samples/s = measured steps x batch size / seconds (every step trains ``batch_size`` sequences,
sampled or not). Because lambda is a coin per step, the two runs take different numbers of on-policy
steps by chance; the table also gives samples/s *at exactly lambda*,
``batch_size / (lambda * t_on + (1 - lambda) * t_off)`` from the mean measured step times of on- and
off-policy steps, which removes that luck from the ratio. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation at the baseline; on the CPU the process's
peak resident set ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end minus its value at the
baseline. The baseline is taken after the framework is imported and the tokenizer, models and dataset
are built, so the peak covers trainer set-up and training (optimizer state, activations, generation
caches, the framework's own buffers); a high-water mark reached before the baseline (imports) would
hide smaller training peaks, so the CPU figure is a lower bound.

    python benchmarks/trl_comparison.py                    # lambda 0.5 and 1.0, vocab 259 and 32,768
    python benchmarks/trl_comparison.py --repeats 3        # median of 3 runs per arm
    python benchmarks/trl_comparison.py --quick            # a smoke test of the script

Writes ``trl_comparison.json`` (every number, the settings of both sides, per-step times) and
``trl_comparison.md`` (the table) to ``--out`` (default ``benchmarks/results``; ``--quick`` writes
``trl_comparison-quick.*``). Set ``OMP_NUM_THREADS`` (or ``--threads``) to the cores to use. Needs the
``bench`` extra (trl, which brings datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.5  # target: distillery >= 1.5x TRL's samples/s at equal settings

# A chat template that renders exactly distillery's layout: <bos> prompt response <eos>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)

PRESETS = {
    "full": {
        "steps": 200,
        "warmup": 5,
        "batch_size": 16,
        "max_new_tokens": 16,
        "teacher": {"hidden_size": 256, "layers": 4, "heads": 4},
        "student": {"hidden_size": 128, "layers": 2, "heads": 4},
        "problems": 2000,
        "vocab_sizes": ["byte", "32768"],
    },
    "quick": {
        "steps": 4,
        "warmup": 1,
        "batch_size": 4,
        "max_new_tokens": 6,
        "teacher": {"hidden_size": 32, "layers": 1, "heads": 2},
        "student": {"hidden_size": 16, "layers": 1, "heads": 2},
        "problems": 64,
        "vocab_sizes": ["byte", "512"],
    },
}


# ----------------------------------------------------------------------------------------------------
# Shared set-up (runs inside each worker)
# ----------------------------------------------------------------------------------------------------


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _build(spec: dict):
    """Tokenizer, prompt/response pairs, teacher and student (seeded: the same weights in every worker)."""
    from distillery.data.text import ArithmeticTask, train_tokenizer
    from distillery.models.causal_lm import CausalLMConfig, build_causal_lm

    tokenizer = train_tokenizer("", kind="byte", use_cache=False)
    pairs = ArithmeticTask(digits=(1, 3), ops=("+",), seed=spec["seed"]).problems(spec["problems"])
    torch.manual_seed(spec["seed"])
    vocab = spec.get("vocab_size") or len(tokenizer)  # output rows; beyond the tokenizer's ids: unused
    teacher = build_causal_lm(CausalLMConfig(**spec["teacher"]), vocab, tokenizer).float()
    student = build_causal_lm(CausalLMConfig(**spec["student"]), vocab, tokenizer).float()
    return tokenizer, pairs, teacher, student, vocab


def _optimizer_settings(optimizer) -> dict:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    groups = inner.param_groups
    return {
        "class": type(inner).__name__,
        "lr": sorted({g["lr"] for g in groups}),
        "betas": sorted({tuple(g["betas"]) for g in groups}),
        "eps": sorted({g["eps"] for g in groups}),
        "weight_decay": sorted({g["weight_decay"] for g in groups}),
        "foreach": sorted({str(g.get("foreach")) for g in groups}),
        "fused": sorted({str(g.get("fused")) for g in groups}),
    }


def _summarise(spec: dict, stamps: list[float], flags: list[int], completion_tokens: list[float]) -> dict:
    """Seconds and samples/s of the measured steps, per-step times, on-policy shares and the rate
    at exactly lambda (from the mean times of on- and off-policy steps)."""
    warm, steps, batch = spec["warmup"], spec["steps"], spec["batch_size"]
    if len(stamps) != warm + steps + 1:
        raise RuntimeError(f"expected {warm + steps} step timestamps, got {len(stamps) - 1}")
    durations = [b - a for a, b in zip(stamps[warm:-1], stamps[warm + 1 :])]
    measured_flags = flags[warm:]
    seconds = stamps[-1] - stamps[warm]
    on = [d for d, f in zip(durations, measured_flags) if f]
    off = [d for d, f in zip(durations, measured_flags) if not f]
    lam = spec["lmbda"]
    t_on = statistics.fmean(on) if on else None
    t_off = statistics.fmean(off) if off else None
    if (lam > 0 and t_on is None) or (lam < 1 and t_off is None):
        at_lambda = None  # the run never took one kind of step that lambda asks for
    else:
        at_lambda = batch / ((lam * t_on if lam > 0 else 0.0) + ((1 - lam) * t_off if lam < 1 else 0.0))
    return {
        "seconds": seconds,
        "samples_per_second": steps * batch / seconds,
        "samples_per_second_at_lambda": at_lambda,
        "step_seconds": durations,
        "mean_on_policy_step_s": t_on,
        "mean_off_policy_step_s": t_off,
        "on_policy_steps": flags,
        "on_policy_fraction": sum(measured_flags) / steps,
        "on_policy_fraction_all_steps": sum(flags) / len(flags),
        "mean_completion_tokens": statistics.fmean(completion_tokens) if completion_tokens else None,
    }


# ----------------------------------------------------------------------------------------------------
# distillery
# ----------------------------------------------------------------------------------------------------


def run_distillery(spec: dict, device: torch.device) -> dict:
    from accelerate import Accelerator

    from distillery.data.text import TokenDataset, special_ids
    from distillery.generation import OnPolicyBatches
    from distillery.losses import JSDLoss, Objective
    from distillery.models.hf import HFCausalLMAdapter
    from distillery.teachers import FrozenTeacher
    from distillery.train import fit
    from distillery.train.config import OptimizerConfig, ScheduleConfig, TrainConfig

    tokenizer, pairs, teacher_model, student, vocab = _build(spec)
    train_set = TokenDataset.from_pairs(pairs, tokenizer)
    baseline = _peak_bytes(device)
    if device.type == "cuda":
        teacher_model.to(device), student.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)

    pad_id, _, eos_id = special_ids(tokenizer)
    adapter = HFCausalLMAdapter(hidden_states=spec["chunked"])
    transform = OnPolicyBatches(
        spec["lmbda"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=spec["temperature"],
        seed=spec["seed"],
        pad_id=pad_id,
        eos_id=eos_id,
    )
    config = TrainConfig(
        steps=spec["warmup"] + spec["steps"],
        batch_size=spec["batch_size"],
        optimizer=OptimizerConfig(name="adamw", lr=spec["lr"], weight_decay=0.0),
        schedule=ScheduleConfig(name="constant"),
        log_every=10**9,
        eval_every=0,
    )
    stamps: list[float] = []
    flags: list[int] = []
    completion_tokens: list[float] = []
    rows: list[int] = []

    def counting(batch, model, step):
        out = transform(batch, model, step)
        rows.append(int(out["input_ids"].shape[0]))
        return out

    def on_step(step: int) -> None:
        stamps.append(_now(device))
        flags.append(int(transform.last["on_policy"]))
        if transform.last["on_policy"]:
            completion_tokens.append(transform.last["sampled_tokens"])

    jsd = JSDLoss(beta=spec["beta"])
    jsd.chunk_size = spec["chunk_size"]
    stamps.append(_now(device))
    fit(
        student,
        train_set,
        Objective({"jsd": jsd}),
        config,
        teacher=FrozenTeacher(teacher_model, adapter),
        adapter=adapter,
        seed=spec["seed"],
        accelerator=Accelerator(cpu=device.type == "cpu"),
        progress=False,
        tensorboard=False,
        on_step=on_step,
        batch_transform=counting,
    )
    peak = _peak_bytes(device) - baseline
    settings = {
        "sampling": {
            "max_new_tokens": transform.max_new_tokens,
            "temperature": transform.temperature,
            "top_p": transform.top_p,
            "top_k": 0,
            "do_sample": True,
        },
        "loss": f"generalized_jsd(beta={spec['beta']}, temperature=1) over the valid tokens of the step"
        + (
            f", chunk by chunk from hidden states ({spec['chunk_size']} tokens per chunk)"
            if spec["chunked"]
            else ""
        ),
        "rows_per_step": sorted(set(rows)),
        "student_dtype": str(next(student.parameters()).dtype),
    }
    return {
        **_summarise(spec, stamps, flags, completion_tokens),
        "vocab": vocab,
        "peak_mb": peak / 2**20,
        "settings": settings,
    }


# ----------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------


def run_trl(spec: dict, device: torch.device) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from distillery.data.text import TokenDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer, pairs, teacher_model, student, vocab = _build(spec)
    tokenizer.chat_template = CHAT_TEMPLATE
    dataset = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": p.prompt},
                    {"role": "assistant", "content": p.response},
                ]
            }
            for p in pairs
        ]
    )
    baseline = _peak_bytes(device)
    if device.type == "cuda":
        teacher_model.to(device), student.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)

    out_dir = tempfile.mkdtemp(prefix="trl-gkd-")
    args = GKDConfig(
        output_dir=out_dir,
        max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=0.0,
        lmbda=spec["lmbda"],
        beta=spec["beta"],
        temperature=spec["temperature"],
        max_new_tokens=spec["max_new_tokens"],
        seq_kd=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        report_to="none",
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
    )

    stamps: list[float] = []
    flags: list[int] = []
    completion_tokens: list[float] = []
    rows: list[int] = []
    sampled = [0]
    seen_optimizer: dict = {}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                seen_optimizer.update(_optimizer_settings(optimizer))
            stamps.append(_now(device))

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(_now(device))
            flags.append(int(sampled[0] > sum(flags)))

    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    # Count TRL's on-policy steps and sampled lengths (its coin is `random.random() <= lmbda`).
    generate = trainer.generate_on_policy_outputs

    def counting_generate(model, inputs, generation_config):
        ids, mask, labels = generate(model, inputs, generation_config)
        sampled[0] += 1
        completion_tokens.append(float((labels != -100).sum(1).float().mean()))
        return ids, mask, labels

    trainer.generate_on_policy_outputs = counting_generate
    collate = trainer.data_collator

    def counting_collate(examples):
        rows.append(len(examples))
        return collate(examples)

    trainer.data_collator = counting_collate
    same_ids = _same_token_ids(collate, dataset, pairs, tokenizer, TokenDataset)

    trainer.train()
    peak = _peak_bytes(device) - baseline
    shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing of value in it
    gen = trainer.generation_config
    settings = {
        "trainer": f"trl.experimental.gkd.GKDTrainer (trl {trl.__version__})",
        "sampling": {
            k: getattr(gen, k)
            for k in ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "use_cache")
        },
        "loss": "GKDTrainer.generalized_jsd_loss(beta) at temperature 1, sum / num_items_in_batch",
        "rows_per_step": sorted(set(rows)),
        "train_batch_size": trainer.args.train_batch_size,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "bf16": trainer.args.bf16,
        "max_grad_norm": trainer.args.max_grad_norm,
        "optimizer": seen_optimizer,
        "token_ids_equal_distillery_layout": same_ids,
        "student_dtype": str(next(student.parameters()).dtype),
    }
    return {
        **_summarise(spec, stamps, flags, completion_tokens),
        "vocab": vocab,
        "peak_mb": peak / 2**20,
        "settings": settings,
    }


def _same_token_ids(collate, dataset, pairs, tokenizer, token_dataset) -> bool:
    """Whether TRL's collator yields distillery's ``<bos> prompt response <eos>`` ids and labels
    (after removing TRL's left padding and distillery's right padding) on the first examples."""
    n = min(8, len(pairs))
    trl_batch = collate([dataset[i] for i in range(n)])
    ours = token_dataset.from_pairs(pairs[:n], tokenizer).get_batch(torch.arange(n))
    for i in range(n):
        keep_t = trl_batch["attention_mask"][i].bool()
        keep_o = ours["attention_mask"][i].bool()
        if not torch.equal(trl_batch["input_ids"][i][keep_t], ours["input_ids"][i][keep_o]):
            return False
        if not torch.equal(trl_batch["labels"][i][keep_t], ours["labels"][i][keep_o]):
            return False
    return True


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    run = {"distillery": run_distillery, "trl": run_trl}[spec["framework"]]
    result = run(spec, device)
    return {**spec, **result, "torch_threads": torch.get_num_threads()}


def run_in_subprocess(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            json.dumps(spec),
            "--result",
            str(path),
        ]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0 or not path.is_file():
            raise RuntimeError(
                f"{spec['framework']} worker (lambda {spec['lmbda']}) failed:\n{proc.stdout[-2000:]}\n"
                f"{proc.stderr[-6000:]}"
            )
        return json.loads(path.read_text())


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


ARMS = (("trl", None), ("distillery", False), ("distillery", True))  # (framework, chunked loss)


def arm_name(framework: str, chunked: bool | None) -> str:
    if framework == "trl":
        return "TRL GKDTrainer"
    return "distillery, chunked loss" if chunked else "distillery, full logits"


def summarise(runs: list[dict], vocabs: list[int], lambdas: list[float]) -> list[dict]:
    """One row per (vocabulary, lambda, arm): medians over repeats, ratios distillery / TRL."""
    rows = []
    for vocab in vocabs:
        for lam in lambdas:
            group = []
            for fw, chunked in ARMS:
                mine = [r for r in runs if r["framework"] == fw and r["lmbda"] == lam and
                        r["vocab"] == vocab and r.get("chunked") == chunked]  # fmt: skip
                if not mine:
                    continue
                group.append({
                    "arm": arm_name(fw, chunked),
                    "framework": fw,
                    "chunked": chunked,
                    "vocab": vocab,
                    "lmbda": lam,
                    "steps": mine[0]["steps"],
                    "repeats": len(mine),
                    "seconds": _median([r["seconds"] for r in mine]),
                    "samples_per_second": _median([r["samples_per_second"] for r in mine]),
                    "samples_per_second_at_lambda": _median([r["samples_per_second_at_lambda"] for r in mine]),
                    "on_policy_fraction": _median([r["on_policy_fraction"] for r in mine]),
                    "peak_mb": max(r["peak_mb"] for r in mine),
                    "mean_completion_tokens": _median([r["mean_completion_tokens"] for r in mine]),
                })  # fmt: skip
            t = group[0]
            for d in group[1:]:
                d["ratio"] = d["samples_per_second"] / t["samples_per_second"]
                d["ratio_at_lambda"] = (
                    d["samples_per_second_at_lambda"] / t["samples_per_second_at_lambda"]
                    if d["samples_per_second_at_lambda"] and t["samples_per_second_at_lambda"]
                    else None
                )
                d["memory_ratio"] = d["peak_mb"] / t["peak_mb"] if t["peak_mb"] > 0 else None
            rows += group
    return rows


def _f(x, digits=2, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def markdown(rows: list[dict], meta: dict) -> str:
    memory = "torch.cuda.max_memory_allocated" if meta["device"] == "cuda" else "ru_maxrss, fresh subprocess"
    lines = [
        f"On-policy distillation (GKD), distillery `fit` + `OnPolicyBatches` vs TRL `GKDTrainer` "
        f"({meta['device']}, float32, {meta['threads']} thread(s); batch {meta['batch_size']}, "
        f"max_new_tokens {meta['max_new_tokens']}, JSD beta {meta['beta']}, sampling temperature "
        f"{meta['temperature']}; teacher {meta['teacher']}, student {meta['student']}; "
        f"{meta['steps']} measured steps after {meta['warmup']} warm-up, median of {meta['repeats']} run(s)). "
        f"Peak = extra memory above the built models ({memory}). "
        f"Target: distillery >= {TARGET_RATIO}x TRL's samples/s.",
        "",
        "| vocabulary | lambda | run | steps | seconds | samples/s | samples/s at exact lambda | on-policy steps "
        "| peak MB | ratio to TRL | ratio at exact lambda |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = _f(r.get("ratio"), suffix="x") if r["framework"] == "distillery" else "-"
        ratio_l = _f(r.get("ratio_at_lambda"), suffix="x") if r["framework"] == "distillery" else "-"
        lines.append(
            f"| {r['vocab']:,} | {r['lmbda']:g} | {r['arm']} | {r['steps']} | {_f(r['seconds'])} | "
            f"{_f(r['samples_per_second'], 1)} | {_f(r['samples_per_second_at_lambda'], 1)} | "
            f"{_f(100 * r['on_policy_fraction'], 0, '%')} | {_f(r['peak_mb'], 0)} | {ratio} | {ratio_l} |"
        )
    lines += ["", *[f"- {n}" for n in meta["notes"]]]
    return "\n".join(lines)


NOTES = [
    "TRL side: trl.experimental.gkd.GKDTrainer (TRL's GKD trainer with lambda; trl.DistillationTrainer "
    "is fully on-policy only). TRL's defaults gradient_checkpointing=True, bf16=True, max_grad_norm=1, "
    "temperature=0.9 and a linear LR decay are overridden to match distillery.",
    "Tokenization: distillery trains on a pre-tokenized TokenDataset; TRL's DataCollatorForChatML applies "
    "the chat template and tokenizes every batch (part of its step time). The token ids are checked equal.",
    "Padding: TRL left-pads training rows, distillery right-pads (a Llama row gives the same logits "
    "either way; only the layout differs). Both left-pad prompts for sampling.",
    "Coins: TRL draws `random.random() <= lmbda` from Python's global RNG, distillery a coin seeded by "
    "(seed, step); the on-policy step counts differ by chance -- compare 'at exact lambda'.",
    "Normaliser: TRL divides by the response tokens of the collated dataset batch (transformers' "
    "num_items_in_batch, counted before the student's samples replace them); distillery by the tokens "
    "actually trained on. Loss values differ on on-policy steps, the cost does not.",
    "Models are untrained (random init): sampled responses run to max_new_tokens on both sides.",
    "Vocabulary: 259 is the byte tokenizer itself; a larger number gives both models that many output "
    "rows (the byte ids plus unused ones), i.e. the output layer, sampling and loss cost of a real "
    "vocabulary that size. Sampled ids are used as ids on both sides, never decoded.",
    "distillery, full logits: the JSD over the models' [batch, length, vocab] logits, as TRL computes it. "
    "distillery, chunked loss (`chunked_loss.enabled: true` in a run config): the models return hidden "
    "states and the JSD is computed chunk by chunk from them and the output layers, on response tokens "
    "only. Both use distillery's closed-form JSD gradient.",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and 4 steps: checks the script")
    p.add_argument("--steps", type=int, help="measured optimizer steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, help="unmeasured optimizer steps first (>= 1)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0], help="on-policy probabilities")
    p.add_argument(
        "--vocab-sizes",
        nargs="+",
        help="output rows of both models: 'byte' (the byte tokenizer's 259 ids) or a number (the byte "
        "tokenizer's ids plus unused rows, the cost of a real vocabulary that size); default: byte 32768",
    )
    p.add_argument(
        "--chunk-size", type=int, default=256, help="tokens per chunk of distillery's chunked loss"
    )
    p.add_argument("--beta", type=float, default=0.5, help="JSD beta")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    p.add_argument("--max-new-tokens", type=int, help="length cap of sampled responses")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=1, help="runs per (framework, lambda); medians reported")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        args.result.write_text(json.dumps(worker(json.loads(args.worker))))
        return 0

    preset = PRESETS["quick" if args.quick else "full"]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {
        **preset,
        "steps": args.steps or preset["steps"],
        "warmup": args.warmup or preset["warmup"],
        "batch_size": args.batch_size or preset["batch_size"],
        "max_new_tokens": args.max_new_tokens or preset["max_new_tokens"],
        "beta": args.beta,
        "temperature": 1.0,
        "lr": args.lr,
        "seed": args.seed,
        "device": device,
        "threads": args.threads,
        "chunk_size": args.chunk_size,
    }
    vocab_sizes = args.vocab_sizes or preset["vocab_sizes"]
    for v in vocab_sizes:
        if v != "byte" and not (v.isdigit() and int(v) >= 259):
            p.error(f"--vocab-sizes: {v!r} is neither 'byte' nor a number >= 259 (the byte tokenizer's ids)")
    if base["warmup"] < 1:
        p.error("--warmup must be >= 1 (the first step's time includes one-off set-up)")

    t0 = time.perf_counter()
    runs = []
    for v in vocab_sizes:
        for lam in args.lambdas:
            for rep in range(args.repeats):
                for fw, chunked in ARMS:  # interleaved, so slow drifts of the machine hit every arm
                    spec = {**base, "framework": fw, "chunked": chunked, "lmbda": lam, "repeat": rep,
                            "vocab_size": None if v == "byte" else int(v)}  # fmt: skip
                    result = run_in_subprocess(spec)
                    runs.append(result)
                    print(
                        f"{arm_name(fw, chunked):>26} vocab {result['vocab']} lambda={lam:g} run {rep + 1}/"
                        f"{args.repeats}: {result['seconds']:.2f}s, {result['samples_per_second']:.1f} samples/s, "
                        f"on-policy {100 * result['on_policy_fraction']:.0f}%, peak {result['peak_mb']:.0f} MB",
                        flush=True,
                    )
    vocabs = list(dict.fromkeys(r["vocab"] for r in runs))
    rows = summarise(runs, vocabs, args.lambdas)
    threads = runs[0]["torch_threads"]
    import transformers
    import trl

    meta = {
        **{k: base[k] for k in ("steps", "warmup", "batch_size", "max_new_tokens", "beta", "temperature")},
        "teacher": base["teacher"],
        "student": base["student"],
        "device": device,
        "threads": threads,
        "repeats": args.repeats,
        "notes": NOTES,
    }
    table = markdown(rows, meta)
    print()
    print(table)
    for r in rows:
        if r["framework"] == "distillery":
            ratio = r["ratio_at_lambda"] or r["ratio"]
            verdict = "meets" if ratio >= TARGET_RATIO else "misses"
            print(
                f"vocabulary {r['vocab']:,}, lambda={r['lmbda']:g}, {r['arm']}: {ratio:.2f}x TRL "
                f"({verdict} the {TARGET_RATIO}x target)"
            )

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "trl_comparison" + ("-quick" if args.quick else "")
    record = {
        "benchmark": "trl_comparison",
        "quick": args.quick,
        "settings": base,
        "lambdas": args.lambdas,
        "vocab_sizes": vocabs,
        "target_ratio": TARGET_RATIO,
        "summary": rows,
        "runs": runs,
        "notes": NOTES,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cuda": torch.cuda.get_device_name() if device == "cuda" else None,
        },
        "seconds": time.perf_counter() - t0,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(f"{record['seconds']:.0f}s; wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
