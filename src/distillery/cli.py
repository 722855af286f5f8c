"""Command line: ``distillery run | cache | recipes | losses | eval``.

User errors (bad config, missing files, data not found) print a short message and exit with code 2;
``--debug`` shows the traceback. Under ``accelerate launch`` every process raises the same user error
(the run's checks are agreed by all of them); only the main process (rank 0) prints it, or every
process with ``--debug``. Ctrl-C (SIGINT) during training writes a checkpoint and exits with 130,
SIGTERM the same with 143; a full disk says which file could not be written (exit 2), and the run
resumes with ``--resume`` once there is space.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import traceback

from rich.console import Console
from rich.markup import escape

from distillery.errors import ConfigError, DistilleryError

EPILOG_RUN = """examples:
  distillery run                                   the built-in default (digits-kd)
  distillery run configs/fashion-mnist-kd.yaml     a recipe file
  distillery run digits-kd seeds=[0,1] train.steps=500 loss.forward_kl.temperature=4
  distillery run digits-kd --resume                continue the latest digits-kd run
"""


EPILOG_CACHE = """examples:
  distillery cache lm-kd-cached                               top-k (k=64) + tail of the Austen teacher
  distillery cache lm-kd-cached teacher.outputs.kind=sampled  64 sampled tokens per position instead
  distillery cache fashion-mnist-kd-cached                    dense logits of the Fashion-MNIST teachers
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distillery",
        description="Knowledge distillation and self-distillation for PyTorch.",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run a recipe or config file (default: the built-in digits-kd recipe)",
        description="Run a distillation recipe: train the teacher (or reuse it), the student and its paired "
        "baseline over the configured seeds, then print and save a report.",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] [KEY=VALUE ...]",
        help="a recipe name or YAML path, then dotted overrides such as train.steps=100",
    )
    r.add_argument(
        "--resume", action="store_true", help="continue the latest run of this config from its checkpoints"
    )
    r.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then stop")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    c = sub.add_parser(
        "cache",
        help="compute a config's teacher outputs once and store them (teacher.source=cache)",
        description="Run the teacher of a config with teacher.source=cache over its training data, for every seed, "
        "and write the outputs to its cache folder (dense logits, top-k + tail, or sampled tokens). Stopped part-way, "
        "the same command continues from the shards written; runs of the config then read the cache.",
        epilog=EPILOG_CACHE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "args", nargs="*", metavar="CONFIG [KEY=VALUE ...]", help="a recipe name or YAML path, then overrides"
    )
    c.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    sub.add_parser(
        "recipes",
        help="list the shipped recipes",
        description="List the shipped recipes (configs/*.yaml) with what they do and how long they take.",
    ).add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    lp = sub.add_parser(
        "losses",
        help="list every loss term with its parameters and defaults",
        description="List the loss terms a config's `loss:` section can name, with each parameter's default "
        "and meaning (the parameters every term has, such as weight, come first).",
    )
    lp.add_argument("name", nargs="?", help="show one term only")
    lp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    e = sub.add_parser(
        "eval",
        help="re-evaluate the saved students of a run directory",
        description="Reload the saved students of RUN_DIR (a run, one seed, or one arm) and evaluate them "
        "again on the test split.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory printed by `distillery run`")
    e.add_argument(
        "--data",
        metavar="FILE",
        help="evaluate on another test set: a YAML file with a data section, or (for runs on your own files) a "
        "data file that replaces the test split",
    )
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    st = sub.add_parser(
        "serve-teacher",
        help="serve a causal LM as a teacher (the prompt log-probabilities of vLLM's completions API)",
        description="Serve the causal LM saved in MODEL_DIR (model and tokenizer) on the subset of vLLM's "
        "OpenAI-compatible API that a distillery run with teacher.source=server asks: GET /v1/models, "
        "POST /v1/completions with prompt_logprobs, POST /tokenize. For tests, small teachers and as the "
        "reference of the protocol; a real-size teacher is better served by vLLM itself (vllm serve MODEL "
        "--max-logprobs K). It listens on 127.0.0.1 unless told otherwise; any other address needs a token.",
    )
    st.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a directory saved with save_pretrained, or a hub id"
    )
    st.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    st.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    st.add_argument("--model-name", help="the model's name in the API (default MODEL_DIR)")
    st.add_argument(
        "--token-env",
        default="DISTILLERY_TEACHER_TOKEN",
        metavar="NAME",
        help="environment variable holding the bearer token clients must send (default "
        "DISTILLERY_TEACHER_TOKEN; unset: no token, loopback only)",
    )
    st.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _split_run_args(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _cmd_run(ns: argparse.Namespace, console: Console) -> int:
    from distillery.config import dump_config, load_config
    from distillery.experiment import run

    source, overrides = _split_run_args(ns.args)
    cfg = load_config(source, overrides)
    if ns.dry_run:
        console.print(dump_config(cfg), markup=False, highlight=False)
        return 0
    command = ["run", *ns.args]  # what reproduces the run, for the model cards
    run(cfg, resume=ns.resume, console=console, progress=not ns.no_progress, command=command)
    return 0


def _cmd_cache(ns: argparse.Namespace, console: Console) -> int:
    from distillery.config import load_config
    from distillery.errors import ConfigError
    from distillery.experiment import cache_outputs

    source, overrides = _split_run_args(ns.args)
    if source is None:
        raise ConfigError("distillery cache needs a config: a recipe name or YAML path (e.g. lm-kd-cached)")
    records = cache_outputs(load_config(source, overrides), console=console, progress=not ns.no_progress)
    for r in records:
        console.print(f"seed {r['seed']}: {r['rows']:,} rows, {r['bytes']:,} bytes in {r['path']}", soft_wrap=True,
                      highlight=False)  # fmt: skip
    return 0


def _cmd_recipes(console: Console) -> int:
    from rich.table import Table

    from distillery.recipes import DEFAULT_RECIPE, list_recipes

    table = Table(title="shipped recipes (distillery run NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("time")
    for r in list_recipes():
        name = r.name + (" (default)" if r.name == DEFAULT_RECIPE else "")
        table.add_row(escape(name), escape(r.description), escape(r.duration))  # ".[encoders]" is not markup
    console.print(table)
    return 0


def _cmd_losses(ns: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from distillery.errors import ConfigError
    from distillery.losses import LOSSES
    from distillery.losses.base import TermConfig

    names = list(LOSSES)
    if ns.name is not None:
        if ns.name not in LOSSES:
            raise ConfigError(f"unknown loss term {ns.name!r}; valid: {', '.join(names)}")
        names = [ns.name]
    shared = set(TermConfig.model_fields)
    table = Table(
        title="loss terms (loss: {<name>: {<parameter>: value}})", title_justify="left", show_lines=True
    )
    table.add_column("term")
    table.add_column("what it is")
    table.add_column("parameters (default)")
    for name in names:
        cfg, module = LOSSES[name]
        doc = (cfg.__doc__ or module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        params = [
            f"{key} = {'(required)' if field.is_required() else repr(field.default)}"
            + (f": {field.description}" if field.description else "")
            for key, field in cfg.model_fields.items()
            if key != "name" and (key not in shared or ns.name is not None)
        ]
        table.add_row(escape(name), escape(doc), escape("\n".join(params)))
    console.print(table)
    if ns.name is None:
        console.print(
            f"every term also takes: {', '.join(k for k in TermConfig.model_fields if k != 'name')}"
        )
    return 0


def _cmd_serve_teacher(ns: argparse.Namespace, console: Console) -> int:
    from distillery.serving import serve
    from distillery.serving.app import is_loopback

    token = os.environ.get(ns.token_env) or None
    if token is None and not is_loopback(ns.host):
        raise ConfigError(
            f"serve-teacher --host {ns.host}: not a loopback address, and no token is set, so anyone who can reach "
            f"this machine could use the teacher; put a token in the environment variable {ns.token_env} (clients "
            "send it as Authorization: Bearer <token>; a distillery run reads teacher.server.token_env), or listen "
            "on 127.0.0.1 and reach it through an SSH tunnel"
        )
    console.print(
        f"serving {ns.model_dir} on http://{ns.host}:{ns.port} ("
        + ("bearer token required" if token else "no token: loopback only")
        + "); Ctrl-C stops",
        highlight=False,
    )
    serve(ns.model_dir, host=ns.host, port=ns.port, token=token, model_name=ns.model_name)
    return 0


def _cmd_eval(ns: argparse.Namespace, console: Console) -> int:
    from distillery.experiment import evaluate_run

    evaluate_run(ns.run_dir, console=console, data=ns.data)
    return 0


def _flags_first(argv: list[str]) -> list[str]:
    """``run CONFIG k=v --no-progress k2=v2`` -> ``run --no-progress CONFIG k=v k2=v2``: argparse stops
    filling a ``nargs="*"`` positional at the first option, so flags may come anywhere on the line.
    (``run`` takes no option with a value, and an override always holds ``=``.)"""
    command = next((c for c in ("run", "cache") if c in argv), None)
    if command is None:
        return argv
    i = argv.index(command) + 1
    head, tail = argv[:i], argv[i:]
    return head + [a for a in tail if a.startswith("-")] + [a for a in tail if not a.startswith("-")]


class _Terminated(BaseException):
    """SIGTERM outside training (training handles it itself: it checkpoints, then stops)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


# Errors of the machine rather than of the code: the user fixes them by freeing space or quota.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _rank() -> int:
    """This process's rank under a distributed launcher (torchrun / accelerate launch, MPI); 0 alone."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns = parser.parse_args(_flags_first(list(sys.argv[1:] if argv is None else argv)))
    console = Console(emoji=False)  # ":-1:" in a signal name is not an emoji code
    if not console.is_terminal:  # logs and pipes: wide enough for the result table
        console = Console(width=120, emoji=False)
    # never re-wrap paths in error messages; under DDP, user errors are printed by rank 0 only
    err = Console(stderr=True, soft_wrap=True, emoji=False)
    once = Console(stderr=True, soft_wrap=True, emoji=False, quiet=_rank() != 0 and not ns.debug)
    if ns.command is None:
        parser.print_help()
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if ns.command == "run":
            return _cmd_run(ns, console)
        if ns.command == "cache":
            return _cmd_cache(ns, console)
        if ns.command == "recipes":
            return _cmd_recipes(console)
        if ns.command == "losses":
            return _cmd_losses(ns, console)
        if ns.command == "serve-teacher":
            return _cmd_serve_teacher(ns, console)
        return _cmd_eval(ns, console)
    except DistilleryError as exc:
        if ns.debug:
            traceback.print_exc()
        once.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, highlight=False)
        if exc.exit_code in (130, 143):
            once.print("resume with the same command and --resume")
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        if ns.debug:
            traceback.print_exc()
        err.print(
            f"[bold red]error:[/bold red] {exc.strerror} while writing {escape(str(exc.filename or 'a file'))}; free some space, "
            "then continue with the same command and --resume (completed arms and checkpoints are kept)",
            markup=True,
            highlight=False,
        )
        return 2
    except _Terminated:
        once.print("terminated (SIGTERM)")
        return 143
    except KeyboardInterrupt:
        if ns.debug:
            traceback.print_exc()
        once.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
