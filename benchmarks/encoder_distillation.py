"""all-MiniLM-L6-v2 -> a 3-layer student (teacher layers 0, 2, 4), every signal under one step budget.

One teacher (all-MiniLM-L6-v2, from the `encoders` extra), one student initialisation (its embeddings
and layers 0, 2, 4), the same training sentences (WordNet glosses and examples of the synsets not
held out), the same number of steps and batch size in every arm, >= 3 seeds. Arms:

* no training: the layer-dropped student as initialised (the runs' ``baseline`` arm);
* sentence-transformers MSE: its own training API (``SentenceTransformerTrainer`` + ``losses.MSELoss``
  on the teacher's embeddings, its distillation recipe), run here side by side, not re-implemented;
* distillery: embedding MSE (the `encoder-mse` recipe), + MiniLM attention and value relations of the
  last layers, + MiniLMv2 Q/K/V relations (the `encoder-minilm` recipe), + hidden-state MSE of the
  last layers, + RKD distance and SP on the pooled embeddings.

Reported on held-out synsets (never trained on): retrieval MRR and recall@1 (definition -> its own
example sentence), linear-probe accuracy (45 lexicographer categories), fidelity (Spearman of the
student's vs the teacher's cosine similarities), encode speed-up over the teacher (same process,
measured back to back), wall time; mean ± std over seeds and paired differences to the
sentence-transformers arm.

    python benchmarks/encoder_distillation.py                      # 3 seeds, 150 steps of 32
    python benchmarks/encoder_distillation.py --steps 300 --seeds 0 1 2 3 4
    python benchmarks/encoder_distillation.py --quick              # a smoke test of the script
    python benchmarks/encoder_distillation.py --arms 2 4 --resume  # add arms to the saved results

Needs ``pip install -c constraints.txt -e ".[encoders]"`` and WordNet (``apt-get install wordnet-base``).
Writes ``benchmarks/results/encoder_distillation.json`` (every number) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

import distillery as ds
from distillery.report.summary import fmt, mean_std, paired_difference, saved_record

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("mrr", "recall_at_1", "probe", "fidelity", "speedup")
MSE = {"features": {"weight": 300.0, "student": "pooled", "teacher": "pooled", "kind": "mse"}}
LAST = ["q:-1", "k:-1", "v:-1"]
ARMS = {
    "distillery MSE": {"features": {"weight": 1.0, "student": "pooled", "teacher": "pooled", "kind": "mse"}},
    "+ MiniLM attention + value relation": {
        **MSE,
        "attention_kl": {"student": "attention:-1", "teacher": "attention:-1"},
        "relation_kl": {"heads": 12, "student": "v:-1", "teacher": "v:-1"},
    },
    "+ MiniLMv2 Q/K/V relations": {**MSE, "relation_kl": {"heads": 12, "student": LAST, "teacher": LAST}},
    "+ hidden-state MSE": {
        **MSE,
        "hidden": {"name": "features", "weight": 1.0, "student": "hidden:-1", "teacher": "hidden:-1"},
    },
    "+ RKD distance + SP (pooled)": {
        **MSE,
        "rkd_distance": {"weight": 25.0, "student": "pooled", "teacher": "pooled"},
        "sp": {"weight": 3000.0, "student": "pooled", "teacher": "pooled"},
    },
}
ST = "sentence-transformers MSE"
NONE = "no training (layer-dropped init)"


def st_arm(task, data, steps: int, batch: int, lr: float, seed: int) -> tuple[dict[str, float], float]:
    """The sentence-transformers distillation recipe on the same student init, sentences and budget."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    from distillery.models.encoder import save_sentence_transformer

    t = task.cfg.teacher
    with tempfile.TemporaryDirectory(prefix="st-arm-") as tmp:
        torch.manual_seed(seed)
        save_sentence_transformer(
            task._new_student(), task.tokenizer, Path(tmp) / "init", pooling=t.pooling, normalize=t.normalize,
            max_seq_length=task.cfg.data.max_length,
        )  # fmt: skip
        student = SentenceTransformer(str(Path(tmp) / "init"), device="cpu")
        teacher = SentenceTransformer(task.source, device="cpu")
        teacher.max_seq_length = task.cfg.data.max_length
        # the sentences this budget sees (steps x batch), drawn from the seed's training sentences
        rng = random.Random(seed)
        pool = list(data.train.sentences)
        sentences = [pool[i] for i in rng.sample(range(len(pool)), min(len(pool), steps * batch))]
        t0 = time.perf_counter()
        labels = teacher.encode(sentences, batch_size=64, convert_to_numpy=True)
        train = Dataset.from_dict({"sentence": sentences, "label": labels.tolist()})
        args = SentenceTransformerTrainingArguments(
            output_dir=str(Path(tmp) / "out"), max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=lr, warmup_ratio=0.1, lr_scheduler_type="linear", weight_decay=0.01, seed=seed,
            report_to=[], save_strategy="no", logging_steps=max(steps // 5, 1), use_cpu=True,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = SentenceTransformerTrainer(
            model=student, args=args, train_dataset=train, loss=losses.MSELoss(student)
        )
        trainer.train()
        seconds = time.perf_counter() - t0
        bert = student[0].auto_model.float().eval()
        return task.evaluate(bert, data, "test"), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150, help="training steps of every arm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the methods")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=Path("runs") / "benchmarks")
    p.add_argument(
        "--arms", nargs="+", default=None, metavar="ARM",
        help=f"run only these distillery arms (by number, 1-{len(ARMS)}, in the order of ARMS); the no-training "
        "and sentence-transformers arms always run",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="keep the arms already in the saved JSON (same seeds, steps, batch and lr) and run only the others",
    )  # fmt: skip
    args = p.parse_args(argv)
    chosen = list(ARMS) if args.arms is None else [list(ARMS)[int(i) - 1] for i in args.arms]
    console = Console(emoji=False)
    steps = 3 if args.quick else args.steps
    sizes = (
        ["data.fidelity_pairs=40", "data.retrieval=40", "data.probe_train=80", "data.probe_test=40",
         "data.train_sentences=200", "eval.speed_sentences=32", "eval.speed_repeats=1"]
        if args.quick
        else ["data.fidelity_pairs=500", "data.retrieval=500", "data.probe_train=1000", "data.probe_test=500"]
    )  # fmt: skip
    common = [
        f"seeds={json.dumps(args.seeds)}", f"output.root={args.runs}", f"train.steps={steps}",
        f"train.batch_size={args.batch}", f"train.optimizer.lr={args.lr}", "train.eval_every=0",
        "data.validation_pairs=0", *sizes,
    ]  # fmt: skip
    console.print(
        f"[bold]encoder distillation[/bold]: seeds {args.seeds}, {steps} steps of {args.batch} per arm"
    )
    t0 = time.perf_counter()
    per_arm: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    teacher: dict[int, dict[str, float]] = {}
    stem = "encoder_distillation" + ("-quick" if args.quick else "")
    earlier = 0.0
    if args.resume:
        teacher, per_arm, seconds, earlier = resume(args, stem, steps)
        chosen = [a for a in chosen if a not in per_arm]
        console.print(f"resuming: {len(per_arm)} arms kept from {stem}.json; to run: {chosen or 'none'}")
    for arm in chosen:
        overrides = [*common, "name=encoder-distillation", f"loss={json.dumps(ARMS[arm])}"]
        overrides.append(f"baseline.enabled={'false' if NONE in per_arm else 'true'}")
        console.rule(arm)
        result = ds.run(ds.load_config("encoder-mse", overrides), console=console, progress=False)
        if NONE not in per_arm:
            per_arm[NONE] = {s: r["metrics"] for s, r in result.arms["baseline"].items()}
            seconds[NONE] = [0.0 for _ in result.arms["baseline"]]
            teacher = {s: t["metrics"] for s, t in result.teachers.items()}
        per_arm[arm] = {s: r["metrics"] for s, r in result.arms["distilled"].items()}
        seconds[arm] = [r["seconds"] for r in result.arms["distilled"].values()]
        if (
            ST not in per_arm
        ):  # sentence-transformers' recipe next to the first arm (written with every result)
            console.rule(ST)
            per_arm[ST], seconds[ST] = {}, []
            for seed in args.seeds:
                data = result.task.prepare(seed)
                metrics, secs = st_arm(result.task, data, steps, args.batch, args.lr, seed)
                per_arm[ST][seed], seconds[ST] = metrics, [*seconds[ST], secs]
                console.print(f"  seed {seed} {ST}: MRR {metrics.get('mrr', float('nan')):.2f} ({secs:.0f}s)")
        write(args, stem, teacher, per_arm, seconds, steps, earlier + time.perf_counter() - t0, argv, chosen)
    if not chosen and per_arm:  # resumed with nothing left to run: the saved table, rewritten
        write(args, stem, teacher, per_arm, seconds, steps, earlier, argv, chosen)
    return 0


def resume(args, stem: str, steps: int):
    """Teacher metrics, per-arm metrics and seconds, and the wall time of the arms in the saved JSON, when
    it was run with the same seeds, steps, batch and learning rate (else an error naming the mismatch)."""
    now = {"seeds": args.seeds, "steps": steps, "batch": args.batch, "lr": args.lr}
    saved = saved_record(args.out / f"{stem}.json", now)
    if saved is None:
        return {}, {}, {}, 0.0
    per_seed = {k: {int(s): m for s, m in v.items()} for k, v in saved["per_seed"].items()}
    teacher = per_seed.pop("teacher")
    secs = saved.get("seconds_per_seed", {})
    # older files kept only the mean and std of the training time: carry those over as they are
    seconds = {a: secs.get(a, saved["results"][a].get("train_seconds")) for a in per_seed}
    args.earlier_commands = [*saved.get("earlier_commands", []), saved["command"]]
    return teacher, per_seed, seconds, float(saved.get("seconds", 0.0))


def write(args, stem, teacher, per_arm, seconds, steps, total, argv, chosen) -> None:
    """The JSON and the table of what has run so far (rewritten after every arm)."""
    n = len(args.seeds)
    rows = {"teacher": {k: mean_std([m[k] for m in teacher.values() if k in m]) for k in METRICS}}
    st = per_arm[ST]
    for arm in [NONE, ST, *[a for a in ARMS if a in per_arm]]:
        by_seed = per_arm[arm]
        stats = {k: mean_std([m[k] for m in by_seed.values() if k in m]) for k in METRICS}
        if arm != ST:
            for k in ("mrr", "probe"):
                stats[f"delta_{k}_vs_st"] = paired_difference(
                    {s: m[k] for s, m in by_seed.items()}, {s: m[k] for s, m in st.items()}
                )
        secs = seconds.get(arm, [0.0])
        stats["train_seconds"] = secs if isinstance(secs, dict) else mean_std(secs)
        rows[arm] = stats
    record = {
        "benchmark": "encoder_distillation",
        "teacher": "all-MiniLM-L6-v2",
        "student": "3 layers, teacher layers [0, 2, 4]",
        "seeds": args.seeds,
        "steps": steps,
        "batch": args.batch,
        "lr": args.lr,
        "quick": args.quick,
        "arms_run": [NONE, ST, *[a for a in ARMS if a in per_arm]],
        "arms_not_run": [a for a in ARMS if a not in per_arm],
        "arms": {ST: "sentence_transformers.losses.MSELoss via SentenceTransformerTrainer", **ARMS},
        "results": rows,
        "per_seed": {"teacher": teacher, **per_arm},
        "seconds_per_seed": {a: v for a, v in seconds.items() if isinstance(v, list)},
        "seconds": total,
        "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/encoder_distillation.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "earlier_commands": getattr(args, "earlier_commands", []),
    }
    table = markdown(rows, n)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(f"{total:.0f}s so far; wrote {args.out / stem}.json and .md")


def markdown(rows: dict, n: int) -> str:
    lines = [
        "| arm | retrieval MRR % | Δ MRR vs ST (paired) | better | recall@1 % | probe acc % | Δ probe vs ST | "
        "fidelity | speed-up | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in rows.items():
        d_mrr, d_probe = s.get("delta_mrr_vs_st"), s.get("delta_probe_vs_st")
        better = "-" if d_mrr is None else f"{sum(v > 0 for v in d_mrr['per_seed'].values())}/{n}"
        secs = fmt(s["train_seconds"], 0) if "train_seconds" in s else "-"
        lines.append(
            f"| {arm} | {fmt(s['mrr'])} | {fmt(d_mrr, signed=True) if d_mrr else '-'} | {better} "
            f"| {fmt(s['recall_at_1'])} | {fmt(s['probe'])} | {fmt(d_probe, signed=True) if d_probe else '-'} "
            f"| {fmt(s['fidelity'], 4)} | {fmt(s['speedup'])} | {secs} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
