"""Fine-tune an OPT checkpoint with one backend.

    optkit train --model DIR|ID --task causal_lm|sequence_classification|question_answering --data FILE [FILE ...]
                 [--eval-data FILE] --backend torch|tf|flax --output DIR [--steps N] [--batch-size B]
                 [--seq-len T] [--lr LR] [--warmup N] [--schedule linear|cosine|constant]
                 [--weight-decay WD] [--max-grad-norm G] [--grad-accum K] [--bf16] [--save-every N]
                 [--eval-every N] [--resume CHECKPOINT] [--seed S] [--replicas N (tf)]

Data (see opt_spec.data): causal_lm reads plain-text files, packed into blocks of --seq-len tokens;
sequence_classification reads JSONL {"text", "label"}; question_answering reads SQuAD-style JSONL
{"context", "question", "answers": {"text": [...], "answer_start": [...]}}. The tokenizer is the
model folder's. A bad data file is refused as FILE:LINE: reason (exit 1).

Output: OUTPUT/metrics.jsonl (one JSON object per training step, kind "train": loss, learning_rate,
grad_norm, tokens, tokens_per_s, and compile_s on an update that compiled; per evaluation, kind "eval"),
OUTPUT/checkpoint-STEP every --save-every updates and OUTPUT/final: Hugging Face folders (with the
tokenizer files) plus the backend's optimizer, schedule and RNG state, each written into a temporary
sibling and renamed into place when complete (under torchrun every process writes its part of that one
sibling, renamed once all succeeded). --resume CHECKPOINT continues such a run exactly (same
settings, else exit 2 naming the options; the batches continue where they stopped). An OUTPUT holding an
earlier run (metrics.jsonl, checkpoint-N, final) is refused unless --resume names one of its checkpoints;
resuming in the run's own folder drops the metrics records it wrote after the checkpoint's step.

--replicas N (tf backend): data parallelism with tf.distribute, MirroredStrategy over N local devices
(the first N GPUs, or N logical devices carved from the CPU), or MultiWorkerMirroredStrategy across
machines when TF_CONFIG is set (then N, if given, is the total number of replicas). --batch-size is
the global micro-batch, split by rows over the replicas; each update equals one device's on the whole
batch. Under several workers only the chief writes metrics and checkpoints.

torch backend under torchrun (`torchrun --standalone --nproc-per-node N -m optkit_cli.main train ...`):
the processes split the model over a mesh, --mesh fsdp=F,tp=T (FSDP2 over F, tensor parallelism over
T; default all FSDP). --batch-size is the global micro-batch, split by rows over fsdp; each update
equals one process's on the whole batch. Rank 0 writes metrics and files; every rank takes part in a
save (trainer_state.dcp/ holds the optimizer state, one file per rank, resumable on any mesh or
without torchrun).

Each backend's `opt_<backend>.training` module provides the trainer (the same small surface:
from_pretrained, from_checkpoint, step, train_step, evaluate, save_checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import time
import warnings

from .checkpoints import cache_root, check_tokenizer_fits, hub_arguments, resolve_folder
from .common import CLIError, Console, seed_type

TASKS = ("causal_lm", "sequence_classification", "question_answering")
TRAINER_NAMES = {"torch": "Trainer", "tf": "TFTrainer", "flax": "FlaxTrainer"}
METRICS_FILE = "metrics.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|ID",
                   help="Hugging Face OPT folder with a tokenizer, or a Hub id such as facebook/opt-125m")
    hub_arguments(p)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="training data: text or JSONL {\"text\"} files (causal_lm), or one JSONL file")
    p.add_argument("--eval-data", nargs="+", metavar="FILE", help="evaluation data, same format")
    p.add_argument("--eval-split", type=float, metavar="F", help="hold out a seeded random fraction F of --data "
                   "for evaluation instead (e.g. 0.05; the same with --resume)")
    p.add_argument("--backend", default="torch", choices=("torch", "tf", "flax"))
    p.add_argument("--output", required=True, metavar="DIR", help="folder for metrics.jsonl and checkpoints")
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer updates in all (default 100)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="examples per micro-batch (default 8)")
    p.add_argument("--seq-len", type=int, default=128, metavar="T",
                   help="block length (causal_lm) or maximum tokens per example (default 128)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--warmup", type=int, default=0, metavar="N", help="linear warm-up updates (default 0)")
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"))
    p.add_argument("--weight-decay", type=float, default=0.0, metavar="WD")
    p.add_argument("--max-grad-norm", type=float, default=1.0, metavar="G", help="global-norm clip; 0 = off")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per update (default 1)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (float32 weights)")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in the process for the next update (glibc malloc: no fresh pages, so no "
                        "page faults, every step; peak memory ~30%% higher; default on, see opt_spec/host.py)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (less memory, more time)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch backend: run the training forward through torch.compile (auto: models of 20M "
                        "parameters or more on one process; compiling takes a minute or more once)")
    p.add_argument("--mesh", metavar="fsdp=F,tp=T",
                   help="flax: shard parameters, gradients, Adam state and batches over F x T devices "
                        "(jax.sharding; a CPU-only machine simulates them); torch, under torchrun: FSDP2 over F "
                        "and tensor parallelism over T processes (default with torchrun: fsdp=-1, all FSDP)")
    p.add_argument("--replicas", type=int, metavar="N",
                   help="tf: data-parallel replicas (tf.distribute); --batch-size is split over them")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N updates (0: only final)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="evaluate every N updates (0: at the end)")
    p.add_argument("--eval-batch-size", type=int, default=None, metavar="B", help="default: --batch-size")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from OUTPUT/checkpoint-STEP of an earlier run")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of shuffling, dropout and fresh heads (default 0)")
    p.add_argument("--documents", default="file", choices=("file", "line", "paragraph"),
                   help="causal_lm: what one document is (default: a whole file)")
    p.add_argument("--drop-last", action="store_true", help="causal_lm: drop the last, partial block")
    p.add_argument("--data-cache", metavar="DIR", help="causal_lm: keep the corpus's token ids here for the next "
                   "run, --resume and the other processes (default $OPTKIT_CACHE/tokens; 'none': do not)")
    p.add_argument("--num-labels", type=int, metavar="L", help="sequence_classification: override the config's")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or status lines")


def _load_data(console: Console, task: str, files: list[str], tokenizer, seq_len: int, options: dict):
    """The examples of `files`; a corpus (causal_lm) with a progress bar of the bytes read, which a large one
    needs (a GB takes minutes) and a cached one never moves."""
    from opt_spec import data as spec_data

    if task != "causal_lm":
        return spec_data.load(task, files, tokenizer, seq_len, **options)
    total = sum(os.path.getsize(f) for f in files)
    with console.progress(total=total, desc=f"reading {', '.join(map(os.path.basename, files))}"[:60], unit="B",
                          unit_scale=True, unit_divisor=1024, delay=1.0) as bar:
        return spec_data.load(task, files, tokenizer, seq_len, progress=bar.update, **options)


def load_trainer_class(backend: str):
    from opt_spec.backend import BACKENDS, EXTRAS, BackendUnavailableError, is_available

    from .runners import BackendNotReady

    if not is_available(backend):
        raise BackendUnavailableError(f"the {backend} backend's framework is not installed: "
                                      f"pip install 'optkit[{EXTRAS[backend]}]'")
    try:
        module = importlib.import_module(f"{BACKENDS[backend]}.training")
    except ImportError as err:  # the framework is there but a part of the extra is not (optax, keras, jax)
        raise BackendNotReady(f"{BACKENDS[backend]}.training does not import ({err}); install the {backend} "
                              f"backend's extra: pip install 'optkit[{EXTRAS[backend]}]'") from None
    return getattr(module, TRAINER_NAMES[backend])


def _check(args) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "warmup"):
        if getattr(args, name) < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.resume and not os.path.isdir(args.resume):
        raise CLIError(f"--resume {args.resume}: not a folder")
    if args.replicas is not None and args.backend != "tf":
        raise CLIError(f"--replicas is the tf backend's data parallelism (tf.distribute), not {args.backend}'s")
    if args.replicas is not None and args.replicas < 1:
        raise CLIError(f"--replicas must be at least 1, got {args.replicas}")
    if not args.max_grad_norm >= 0:  # nan too: it would turn clipping off without a word
        raise CLIError(f"--max-grad-norm must be >= 0 (0 turns clipping off), got {args.max_grad_norm}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise CLIError(f"--eval-batch-size must be at least 1, got {args.eval_batch_size}")
    if args.eval_split is not None and (args.eval_data or not 0 < args.eval_split < 1):
        raise CLIError(f"--eval-split {args.eval_split}: " + ("give --eval-data or --eval-split, not both"
                       if args.eval_data else "a fraction between 0 and 1"))
    for option, files in (("--data", args.data), ("--eval-data", args.eval_data or [])):
        for path in files:
            if not os.path.exists(path):
                raise CLIError(f"{option} {path}: no such file")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CLIError(f"--output {args.output}: a file, not a folder")


def _train_config(args):
    """The run's TrainConfig, checked before anything loads: its message names the field out of range."""
    from opt_spec.training import TrainConfig

    try:
        return TrainConfig(learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
                           total_steps=args.steps, schedule=args.schedule,
                           max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
                           gradient_accumulation_steps=args.grad_accum,
                           mixed_precision="bf16" if args.bf16 else None, seed=args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None


# The option that sets each TrainConfig field, to name in a refused --resume.
OPTIONS = {"learning_rate": "--lr", "weight_decay": "--weight-decay", "warmup_steps": "--warmup",
           "total_steps": "--steps", "schedule": "--schedule", "max_grad_norm": "--max-grad-norm",
           "gradient_accumulation_steps": "--grad-accum", "mixed_precision": "--bf16", "seed": "--seed"}


def _run_files(output: str) -> list[str]:
    """What an earlier run left in `output` (metrics, checkpoints), latest checkpoint last."""
    if not os.path.isdir(output):
        return []
    names = [n for n in os.listdir(output) if n in (METRICS_FILE, "final") or re.fullmatch(r"checkpoint-\d+", n)]
    return sorted(names, key=lambda n: (n.startswith("checkpoint-"), int(n[11:]) if n[11:].isdigit() else 0))


def _refuse_earlier_run(output: str) -> None:
    """A run writes into a fresh --output: one holding an earlier run's metrics and checkpoints would be
    overwritten piecemeal (its metrics.jsonl emptied, some checkpoints replaced, others left), so it is
    refused, and --resume continues that run instead."""
    found = _run_files(output)
    if found:
        latest = [n for n in found if n.startswith("checkpoint-")][-1:]
        hint = f"continue it with --resume {os.path.join(output, latest[0])}, or " if latest else ""
        raise CLIError(f"--output {output} already holds a training run ({', '.join(found[:4])}"
                       f"{', ...' if len(found) > 4 else ''}); nothing was changed: {hint}choose another --output")


def _continues_run_in(resume: str | None, output: str) -> bool:
    """Whether --resume names a checkpoint of the run in --output (OUTPUT/checkpoint-N): only that run is
    continued in place; another run's checkpoint resumed into it would overwrite it piecemeal too."""
    return bool(resume) and os.path.dirname(os.path.realpath(resume)) == os.path.realpath(output)


def _keep_metrics_until(path: str, step: int) -> None:
    """Resuming at `step` in the folder of the run that wrote `path`: the records that run wrote after
    `step` (it went on before it stopped) are dropped, so the file tells one history, not two."""
    if not os.path.isfile(path):
        return
    from opt_spec.io import atomic_write_text

    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short when that run was killed
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


def _tokenizer_files(model_dir: str) -> list[str]:
    """The model folder's tokenizer files that every checkpoint gets a copy of, each checked by the weights'
    rule (opt_spec.io.checkpoint_file) before training starts: a `merges.txt -> ~/.ssh/id_rsa` beside a
    tokenizer.json is never read by the tokenizer, but a copy would put the key into every checkpoint."""
    from opt_spec.io import checkpoint_file

    from opt_spec.hub import TOKENIZER_FILES

    return [checkpoint_file(model_dir, name) for name in TOKENIZER_FILES
            if os.path.lexists(os.path.join(model_dir, name))]


def _save(trainer, directory: str, tokenizer_files: list[str], need: int, collective: bool = False) -> None:
    """A checkpoint folder, written into a temporary sibling and renamed into place when complete
    (opt_spec.io.atomic_path): a run killed while saving leaves the earlier content of `directory` or
    nothing, never weights without their trainer state nor one save's weights with another's state.
    Under torch.distributed every rank writes its part into the one temporary folder rank 0 made
    (_collective_atomic_path). `need`: the checkpoint's bytes at least, asked of the disk first (inside the
    collective save, so that every rank learns of a refusal)."""
    from opt_spec.io import atomic_path, check_free_space

    with _collective_atomic_path(directory) if collective else atomic_path(directory) as target:
        check_free_space(directory, need, what="the checkpoint (weights and optimizer state)")
        try:
            trainer.save_checkpoint(target)
            for src in tokenizer_files:  # a checkpoint is a complete Hugging Face folder
                shutil.copyfile(src, os.path.join(target, os.path.basename(src)))
        except OSError as err:  # a full disk, a quota: said of the checkpoint, not of a temporary file
            raise OSError(f"{directory}: saving the checkpoint failed ({err})") from None
        except RuntimeError as err:  # torch.save's zip writer reports a failed write as a RuntimeError
            if not any(word in str(err) for word in ("inline_container", "PytorchStreamWriter")):
                raise
            raise OSError(f"{directory}: saving the checkpoint failed (torch.save: {err})") from None


@contextlib.contextmanager
def _collective_atomic_path(directory: str):
    """atomic_path for a save every torch.distributed rank takes part in: rank 0 makes the temporary
    sibling and tells the others its name; once every rank has written its part and said whether it
    succeeded, rank 0 renames it into place, or removes it when any rank failed (every rank then raises)."""
    import torch
    import torch.distributed as dist
    from opt_spec.io import atomic_path

    chief = dist.get_rank() == 0
    writer, name = (atomic_path(directory) if chief else None), [None]
    if chief:
        try:
            name[0] = writer.__enter__()
        except OSError as err:  # said to every rank, which would otherwise wait for the name forever
            name[0] = err
    dist.broadcast_object_list(name, src=0)
    if isinstance(name[0], BaseException):
        raise name[0]
    failed, elsewhere = None, False
    try:
        yield name[0]
    except BaseException as err:
        failed = err
        raise
    finally:
        ok = torch.tensor([0 if failed is not None else 1])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank has finished writing, and says how it went
        if failed is None and not ok.item():
            failed, elsewhere = RuntimeError(f"{directory}: not saved, another rank failed while saving"), True
        renamed = [None]
        if chief:  # the rename, or the removal of the temporary folder
            try:
                writer.__exit__(type(failed) if failed is not None else None, failed, None)
            except OSError as err:  # the rename failed: every rank hears it, none waits in a later collective
                renamed[0] = err
        dist.broadcast_object_list(renamed, src=0)
        if failed is None and renamed[0] is not None:
            failed, elsewhere = renamed[0], True
        if elsewhere:
            raise failed


def _torch_mesh(text: str | None, config):
    """--mesh fsdp=F,tp=T for the torch backend, launched by torchrun: the ("dp", "tp") DeviceMesh over the
    job's processes (dp is the spec's fsdp; without --mesh, fsdp=-1: every process data parallel).
    Returns the mesh, whether this is rank 0 (which writes metrics and files), and whether this call
    started the process group."""
    from opt_spec.parallel import check_plan, parse_mesh

    try:
        sizes = parse_mesh(text) if text is not None else {"fsdp": -1, "tp": 1}
        import torch.distributed as dist

        from opt_torch.distributed import init_mesh

        created = not dist.is_initialized()
        mesh = init_mesh(dp=sizes["fsdp"], tp=sizes["tp"])
        check_plan(config, fsdp=mesh.size(0), tp=mesh.size(1))
    except ValueError as err:
        raise CLIError(f"--mesh: {err}" + ("" if "RANK" in os.environ else
                                           " (launch with torchrun --nproc-per-node N optkit train ...)")) from None
    return mesh, dist.get_rank() == 0, created


def run(args, console: Console) -> int:
    from opt_spec import OPTConfig
    from opt_spec import data as spec_data
    from opt_spec.tokenizer import OPTTokenizer
    from opt_spec.io import check_free_space
    from opt_spec.training import ResumeMismatchError, checkpoint_nbytes

    _check(args)
    cfg = _train_config(args)
    if args.retain_memory:  # before the backend allocates anything (opt_spec/host.py)
        from opt_spec.host import retain_freed_memory

        retain_freed_memory()
    if args.backend == "torch" and os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        console.quiet = True
    args.model, _ = resolve_folder(args.model, "--model", console, getattr(args, "revision", None),
                                   getattr(args, "cache_dir", None))
    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: not a folder")
    trainer_cls = load_trainer_class(args.backend)
    config = OPTConfig.from_pretrained(args.resume or args.model)
    if args.num_labels is not None and not args.resume:
        try:
            config = config.replace(num_labels=args.num_labels)
        except ValueError as err:
            raise CLIError(f"--num-labels {args.num_labels}: {err}") from None
    if args.seq_len > config.max_position_embeddings:
        raise CLIError(f"--seq-len {args.seq_len} is more than the model's max_position_embeddings="
                       f"{config.max_position_embeddings}")
    tokenizer = OPTTokenizer.from_pretrained(args.model, config)
    check_tokenizer_fits(tokenizer, config, args.model)
    tokenizer_files = _tokenizer_files(args.model)

    options = {}
    if args.task == "causal_lm":
        cache = args.data_cache or os.path.join(cache_root(), "tokens")
        options = {"documents": args.documents, "drop_last": args.drop_last,
                   "cache_dir": None if cache == "none" else cache}
    elif args.task == "sequence_classification":
        options = {"num_labels": config.num_labels}
    train_set = _load_data(console, args.task, args.data, tokenizer, args.seq_len, options)
    eval_set = None
    if args.eval_split is not None:
        try:
            train_set, eval_set = spec_data.split(train_set, args.eval_split, seed=args.seed)
        except ValueError as err:
            raise CLIError(f"--eval-split {args.eval_split}: {err}") from None
    if args.eval_data:
        eval_options = dict(options, drop_last=False) if args.task == "causal_lm" else options
        eval_set = _load_data(console, args.task, args.eval_data, tokenizer, args.seq_len, eval_options)
    console.info(f"{args.task}: {len(train_set)} training examples" +
                 (f", {len(eval_set)} for evaluation" if eval_set is not None else ""))

    kwargs = {"gradient_checkpointing": True} if args.gradient_checkpointing else {}
    if args.compile != "auto":
        if args.backend != "torch":
            raise CLIError(f"--compile {args.compile} is a torch backend option (TF and Flax always compile with XLA)")
        kwargs["compile"] = args.compile == "on"
    chief = True
    if args.backend == "tf" and (args.replicas is not None or os.environ.get("TF_CONFIG")):
        try:  # before TensorFlow runs anything: CPU replicas are logical devices fixed at start-up
            strategy = importlib.import_module("opt_tf.training").data_parallel_strategy(args.replicas)
        except (ValueError, RuntimeError) as err:
            raise CLIError(f"--replicas {args.replicas}: {err}") from None
        if strategy is not None:
            kwargs["strategy"] = strategy
            chief = strategy.extended.should_checkpoint  # the one worker that writes (tf.distribute's choice)
    collective = False  # every process takes part in a save (torch.distributed: the gathers are collectives)
    torch_split = args.backend == "torch" and (getattr(args, "mesh", None) is not None
                                               or int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if torch_split:  # torchrun: one process per device; without --mesh they are all data parallel
        kwargs["device_mesh"], chief, created = _torch_mesh(args.mesh, config)
        collective = True
    elif getattr(args, "mesh", None) is not None:  # before JAX starts: its device count is fixed then
        from .runners import flax_mesh, mesh_option

        kwargs["mesh"] = flax_mesh(mesh_option(args.mesh, args.backend))
    if chief and not _continues_run_in(args.resume, args.output):  # the one process that writes run files checks
        _refuse_earlier_run(args.output)
    with console.step(f"loading the {args.backend} trainer"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.resume:
            try:
                trainer = trainer_cls.from_checkpoint(args.resume, cfg, **kwargs)
            except ResumeMismatchError as err:
                options = ", ".join(OPTIONS.get(name, name) for name in err.fields)
                raise CLIError(f"--resume {err} (set by {options})") from None
        else:
            trainer = trainer_cls.from_pretrained(args.model, args.task, cfg, config=config, **kwargs)
    for w in caught:  # e.g. a head the checkpoint lacks, freshly initialized: one line, not a stack location
        if issubclass(w.category, UserWarning):
            console.warn(f"warning: {w.message}")
    if trainer.step >= args.steps:
        raise CLIError(f"--resume {args.resume} is at step {trainer.step}; nothing left to do for --steps {args.steps}")

    need = checkpoint_nbytes(config, args.task)
    if chief:  # a run that cannot save its final checkpoint is refused before its first update
        check_free_space(args.output, need, what="a checkpoint (weights and optimizer state)")
    os.makedirs(args.output, exist_ok=True)
    if chief and args.resume:
        _keep_metrics_until(os.path.join(args.output, METRICS_FILE), trainer.step)
    stream = spec_data.BatchStream(train_set, args.batch_size, seed=args.seed)
    eval_batch = args.eval_batch_size or args.batch_size
    accum = args.grad_accum
    log = open(os.path.join(args.output, METRICS_FILE) if chief else os.devnull, "a" if args.resume else "w",
               encoding="utf-8")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    def evaluate(step: int) -> dict:
        result = trainer.evaluate(eval_set, eval_batch)
        write({"kind": "eval", "step": step, **result})
        console.info(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    start = trainer.step
    bar = console.progress(total=args.steps, desc=f"train ({args.backend})", unit="step")
    bar.update(start)
    last_eval = None
    try:
        while trainer.step < args.steps:
            k = trainer.step * accum
            micro = [stream.batch(k + j) for j in range(accum)]
            t0 = time.perf_counter()
            out = trainer.train_step(micro)
            dt = time.perf_counter() - t0
            step = trainer.step
            record = {"kind": "train", "step": step, "loss": float(out["loss"]),
                      "learning_rate": float(out["learning_rate"]), "grad_norm": float(out["grad_norm"]),
                      "tokens": int(out["tokens"]), "tokens_per_s": int(out["tokens"]) / dt if dt > 0 else None}
            if "compile_s" in out:  # a trainer that compiled during this update says how long that took
                record["compile_s"] = float(out["compile_s"])
            write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                            tok_s=f"{record['tokens_per_s'] or 0:.0f}")
            if eval_set is not None and args.eval_every and step % args.eval_every == 0:
                evaluate(step)
                last_eval = step
            if (chief or collective) and args.save_every and step % args.save_every == 0:
                _save(trainer, os.path.join(args.output, f"checkpoint-{step}"), tokenizer_files if chief else [],
                      need, collective=collective)
    finally:
        bar.close()
        log.flush()
    if eval_set is not None and last_eval != trainer.step:
        evaluate(trainer.step)
    final = os.path.join(args.output, "final")
    if chief or collective:
        _save(trainer, final, tokenizer_files if chief else [], need, collective=collective)
    log.close()
    if torch_split and created:
        import torch.distributed as dist

        dist.destroy_process_group()
    console.info(f"trained {trainer.step - start} updates; model and trainer state in {final}, "
                 f"metrics in {os.path.join(args.output, METRICS_FILE)}")
    return 0
