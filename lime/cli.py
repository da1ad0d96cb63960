"""The `lime` command line: train, evaluate, and run the demo.

    lime train --model DIR --data DIR [--data-root DIR] [--output DIR] [LiME and Trainer options]
    lime eval  --model DIR --adapter DIR --data DIR [--data-root DIR] [--out DIR]
    lime demo  --out DIR

`--model` is a local LLaVA-OneVision checkpoint directory (weights, config, processor); `--data` a
local MMT-47 copy (`save_to_disk` directory or data files), whose media paths are relative to
`--data-root` (default: the data directory). `lime eval` under `torchrun` / `accelerate launch` shares
the batches among the processes and writes the single-process results. A bad path or option is a
one-line error (`--debug` shows the traceback). `lime train --compat original` trains layers that compute
what the original LiME code computes (and floors video frame positions); `lime eval` takes compat from the
adapter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Optional

import torch

from lime_kernels.options import BACKENDS, COMPAT_MODES, NGRAM_MODES, REP_MODES, ROUTERS

from .injection import README_TARGETS
from .inputs import FRAME_ROUNDINGS, TRUNCATIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A problem with what the user asked for: reported on one line."""


def _directory(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is not a directory")
    return path


def _writable_directory(path: str, what: str) -> str:
    """`path`, created if needed, once a file could be written there: a run whose results cannot be saved
    stops before it starts."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"{what} {path!r} is not a writable directory: {error.strerror or error}") from None
    return path


def _load_model(path: str, dtype: str, stock_processor: bool = False):
    """The model and processor of `path`; unless `stock_processor`, with the original LiME code's image
    settings on both (`lime.inputs.use_original_image_settings`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .inputs import use_original_image_settings

    _directory(path, "--model")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if stock_processor:
        print("images: the checkpoint's own processor settings (--stock-processor)")
    else:
        settings = use_original_image_settings(processor, model.config)
        print(f"images: the original LiME code's settings, image_grid_pinpoints {settings['image_grid_pinpoints']} and "
              f"size {settings['image_size']}x{settings['image_size']} (--stock-processor keeps the checkpoint's)")
    return model, processor


def _truncation_report(rows_by_split: Dict[str, List[int]], answer_lost: int, max_length: int, mode: str) -> str:
    """One line on the rows cut to --max-length, by split (none: says so)."""
    total = sum(len(rows) for rows in rows_by_split.values())
    if not total:
        return f"truncated no row (--truncate {mode}, --max-length {max_length})"

    def listed(rows: List[int]) -> str:
        return ", ".join(str(row) for row in rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")

    splits = "; ".join(f"split {name!r} rows {listed(sorted(rows))}" for name, rows in rows_by_split.items() if rows)
    lost = f"; {answer_lost} of them kept no answer token" if answer_lost else ""
    return f"truncated {total} over-long row(s) to --max-length {max_length} (--truncate {mode}): {splits}{lost}"


def _frame_sampling(args, compat: str) -> str:
    """--frame-sampling, or the one `compat` implies: the original floors frame positions."""
    if args.frame_sampling is not None:
        return args.frame_sampling
    return "floor" if compat == "original" else "round"


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="local MMT-47 copy (save_to_disk directory or data files)")
    parser.add_argument("--data-root", default=None, help="directory the rows' media_path are relative to (default: --data)")
    parser.add_argument("--num-video-frames", type=int, default=8, help="frames sampled per video (default 8)")
    parser.add_argument("--max-length", type=int, default=2048, help="longest sequence in tokens (default 2048)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip (and list) rows with an unknown source_type, an empty question or answer, or a "
                             "missing/unreadable media file (a missing column stays an error)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model weights' dtype (default float32)")
    parser.add_argument("--stock-processor", action="store_true",
                        help="keep the checkpoint's image settings (up to 9 tiles per image) instead of the original "
                             "LiME code's one tile at the vision tower's size (image_grid_pinpoints [[384, 384]])")
    parser.add_argument("--frame-sampling", choices=FRAME_ROUNDINGS, default=None,
                        help="video frame indices: evenly spaced positions rounded or floored (the original LiME "
                             "code's); default round, floor with compat original (lime eval: the adapter's)")
    parser.add_argument("--truncate", nargs="?", choices=TRUNCATIONS, const="question", default=None,
                        help="cut rows longer than --max-length instead of stopping with an error: 'question' "
                             "(the bare flag) cuts the end of the question and keeps the media, the prompt's end "
                             "and the answer; 'tail' keeps the first --max-length tokens, as the original LiME code "
                             "(the answer can be cut). Cut rows are counted and listed")


def _lime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LiME")
    group.add_argument("--peft", choices=["lora", "dora", "lora_fa", "slicefine"], default="lora", help="shared adapter")
    group.add_argument("--targets", nargs="+", default=list(README_TARGETS),
                       help="module-name suffixes to wrap (default: the LiME README's)")
    group.add_argument("--num-experts", type=int, default=4, help="experts E (default 4)")
    group.add_argument("--rank", type=int, default=2, help="adapter rank r (default 2)")
    group.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha: delta is scaled by alpha / rank")
    group.add_argument("--top-k", type=int, default=1, help="top-k experts (default 1)")
    group.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter's input")
    group.add_argument("--temperature", type=float, default=0.5, help="routing softmax temperature (default 0.5)")
    group.add_argument("--gamma-routing", type=float, default=0.7, help="frozen (0) vs adapted (1) routing blend")
    group.add_argument("--compat", choices=COMPAT_MODES, default="lime",
                       help="'lime' (default): the corrected semantics; 'original': what the original LiME code "
                            "computes (maxabs router, n-gram anchors, its DoRA/SliceFine/statistics; README, "
                            "'Differences from the original LiME code'), and floored video frames")
    group.add_argument("--router", choices=ROUTERS, default=None,
                       help="routing feature normalization (default cosine; maxabs with --compat original)")
    group.add_argument("--rep-mode", choices=REP_MODES, default="token", help="routing representation")
    group.add_argument("--n-gram", type=int, default=1, help="n-gram routing window (default 1)")
    group.add_argument("--ngram-mode", choices=NGRAM_MODES, default=None,
                       help="n-gram pooling (default window; anchor with --compat original)")
    group.add_argument("--jitter-noise", type=float, default=0.1, help="training routing noise (default 0.1)")
    group.add_argument("--no-auto-topk", action="store_true", help="fixed top-k instead of AutoTop-K (soft, or hard with --sparse)")
    group.add_argument("--auto-topk-threshold", type=float, default=0.5, help="AutoTop-K theta (default 0.5)")
    group.add_argument("--no-shared", action="store_true", help="no shared modulation vector")
    group.add_argument("--sparse", action="store_true", help="hard masks with exact zeros")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="auto (Triton on CUDA, the C++ operators on the CPU), reference, triton or cpu")


def _trainer_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output", default="lime-output", help="output directory (checkpoints, adapter/)")
    group.add_argument("--epochs", type=float, default=1.0, help="training epochs (default 1)")
    group.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    group.add_argument("--batch-size", type=int, default=2, help="per-device batch size (default 2)")
    group.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    group.add_argument("--moe-lr", type=float, default=1e-3, help="learning rate of the expert vectors (default 1e-3)")
    group.add_argument("--peft-lr", type=float, default=4e-4, help="learning rate of the adapter (default 4e-4)")
    group.add_argument("--weight-decay", type=float, default=0.01, help="adapter weight decay (default 0.01)")
    group.add_argument("--warmup", type=float, default=0.03,
                       help="learning-rate warm-up: steps, or a share of the total below 1 (default 0.03)")
    group.add_argument("--importance-coef", type=float, default=0.1, help="importance loss weight (default 0.1)")
    group.add_argument("--kl-coef", type=float, default=0.01, help="KL-uniform loss weight (default 0.01)")
    group.add_argument("--balance-every", type=int, default=50, help="balance loss every n steps (default 50)")
    group.add_argument("--optim", default="adamw_torch", help="Trainer optimizer, e.g. adamw_bnb_8bit")
    group.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    group.add_argument("--cpu", action="store_true",
                       help="train on the CPU even where a GPU exists (also what --bf16 needs without a GPU)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument("--compile", action="store_true",
                       help="train through torch.compile(model) (the Trainer's torch_compile): one graph per model; "
                            "the first steps compile it")
    group.add_argument("--logging-steps", type=int, default=10, help="log every n steps (default 10)")
    group.add_argument("--save-steps", type=int, default=500, help="checkpoint every n steps (default 500)")
    group.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--report-to", nargs="*", default=[], help="Trainer integrations (tensorboard, wandb, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lime", description="LiME: train and evaluate LLaVA-OneVision on MMT-47")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    # --debug is also taken after the subcommand; SUPPRESS keeps a subcommand from resetting `lime --debug ...`.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[debug],
                                help="wrap a model with LiME and train it on MMT-47's train split")
    train.add_argument("--model", required=True, help="local LLaVA-OneVision checkpoint directory")
    _data_options(train)
    _lime_options(train)
    _trainer_options(train)

    evaluate = commands.add_parser("eval", parents=[debug], help="evaluate a LiME adapter on MMT-47's test splits")
    evaluate.add_argument("--model", required=True, help="local LLaVA-OneVision checkpoint directory (the base)")
    evaluate.add_argument("--adapter", required=True, help="LiME adapter directory (lime train's output/adapter)")
    _data_options(evaluate)
    evaluate.add_argument("--out", default="lime-eval", help="directory for results.csv and results.json")
    evaluate.add_argument("--batch-size", type=int, default=6, help="generation batch size (default 6)")
    evaluate.add_argument("--max-new-tokens", type=int, default=50, help="generated tokens per answer (default 50)")
    evaluate.add_argument("--num-samples", type=int, default=None, help="first n rows of each split (default all)")
    evaluate.add_argument("--splits", nargs="+", default=None, help="test splits to evaluate (default all)")
    evaluate.add_argument("--compile", action="store_true",
                          help="generate with a static cache and a compiled decoding step (torch.compile; each new "
                               "prompt length compiles again)")

    demo = commands.add_parser("demo", parents=[debug], help="the offline demo on a tiny model and generated data")
    demo.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _train(args) -> None:
    from .adapter import save_adapter
    from .config import LiMEConfig
    from .data import MultiModalCollator, MultiModalDataset, load_mmt47, validate_split
    from .evaluation import check_sizes
    from .injection import apply_peft
    from .summary import print_lime_summary
    from .trainer import LiMEArguments, LiMETrainer, checkpointing_arguments

    data_root = _directory(args.data_root or args.data, "--data-root")
    if args.resume is not None:
        _directory(args.resume, "--resume")
    _writable_directory(args.output, "--output")
    lime_options = dict(
        targets=args.targets, peft=args.peft, num_experts=args.num_experts, rank=args.rank, alpha=args.alpha,
        top_k=args.top_k, dropout=args.dropout, temperature=args.temperature, gamma_routing=args.gamma_routing,
        router=args.router, rep_mode=args.rep_mode, n_gram=args.n_gram, ngram_mode=args.ngram_mode,
        jitter_noise=args.jitter_noise, auto_topk=not args.no_auto_topk, auto_topk_threshold=args.auto_topk_threshold,
        use_shared_LiME=not args.no_shared, sparse_mode=args.sparse, backend=args.backend, compat=args.compat,
    )
    LiMEConfig(**lime_options)  # every option checked before the model loads, which can take minutes
    check_sizes(num_video_frames=args.num_video_frames, max_length=args.max_length)
    training = LiMEArguments(
        output_dir=args.output, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        moe_lr=args.moe_lr, peft_lr=args.peft_lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
        importance_coef=args.importance_coef, kl_coef=args.kl_coef, balance_every_n_steps=args.balance_every,
        optim=args.optim, bf16=args.bf16, logging_steps=args.logging_steps, save_steps=args.save_steps,
        seed=args.seed, report_to=args.report_to, remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and not args.cpu, use_cpu=args.cpu, torch_compile=args.compile,
        **(checkpointing_arguments() if args.gradient_checkpointing else {}),
    )
    data = load_mmt47(args.data)
    if "train" not in data:
        raise UserError(f"{args.data} has no train split (splits: {list(data)})")
    train_split, skipped = validate_split(data["train"], "train", data_root, skip_bad_rows=args.skip_bad_rows)
    if skipped:
        print(f"skipped {len(skipped)} bad row(s):\n" + "\n".join(f"  {row}" for row in skipped))
    model, processor = _load_model(args.model, args.dtype, args.stock_processor)
    apply_peft(model, **lime_options, tokenizer=processor.tokenizer)
    print_lime_summary(model)
    dataset = MultiModalDataset(train_split, processor, data_root, args.num_video_frames, args.max_length,
                                frame_rounding=_frame_sampling(args, args.compat), truncate=args.truncate)
    trainer = LiMETrainer(model=model, args=training, train_dataset=dataset, processing_class=processor,
                          data_collator=MultiModalCollator(processor, max_length=args.max_length))
    trainer.train(resume_from_checkpoint=args.resume)
    print(f"adapter written to {save_adapter(model, os.path.join(args.output, 'adapter'))}")
    if args.truncate is not None:
        truncated, answer_lost = dict(dataset.truncated), set(dataset.answer_lost)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # each process read its rows
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (truncated, answer_lost))
            truncated = {row: length for part, _ in gathered for row, length in part.items()}
            answer_lost = set().union(*(lost for _, lost in gathered))
        print(_truncation_report({"train": list(truncated)}, len(answer_lost), args.max_length, args.truncate))


def _evaluate(args) -> None:
    from accelerate import PartialState

    from .adapter import load_adapter, saved_compat
    from .data import check_columns, load_mmt47, test_splits
    from .evaluation import check_sizes, run_full_evaluation

    data_root = _directory(args.data_root or args.data, "--data-root")
    _directory(args.adapter, "--adapter")
    _writable_directory(args.out, "--out")
    check_sizes(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                num_samples_per_split=args.num_samples, num_video_frames=args.num_video_frames,
                max_length=args.max_length)  # before the model loads
    # Under torchrun / accelerate launch, accelerate joins the process group (gloo on CPU, NCCL on GPUs)
    # and gives each process its device; run_full_evaluation then splits the batches among them.
    # (accelerate starts CPU processes only when told that there is no GPU.)
    state = PartialState(cpu=not torch.cuda.is_available())
    data = load_mmt47(args.data)
    for name in args.splits or test_splits(data):  # before the model loads (unknown names: run_full_evaluation)
        if name in data:
            check_columns(data[name], name)
    frame_rounding = _frame_sampling(args, saved_compat(args.adapter))  # the adapter's, before the model loads
    model, processor = _load_model(args.model, args.dtype, args.stock_processor)
    load_adapter(model, args.adapter)
    model.to(state.device)
    summary = run_full_evaluation(
        model, processor, data, data_root, num_samples_per_split=args.num_samples, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, num_video_frames=args.num_video_frames, max_length=args.max_length,
        splits=args.splits, skip_bad_rows=args.skip_bad_rows, save_csv=os.path.join(args.out, "results.csv"),
        save_json=os.path.join(args.out, "results.json"), frame_rounding=frame_rounding, truncate=args.truncate,
        compile=args.compile,
    )
    if not state.is_main_process:
        return
    for name, metrics in summary["splits"].items():
        print(f"{name}: accuracy {metrics['accuracy']:.4f}, original scoring {metrics['accuracy_original']:.4f}"
              f" ({metrics['samples']} samples)")
    overall = summary["overall"]
    # Two figures: ours, and the one comparable with the paper's MMT-47 table.
    print(f"overall: accuracy {overall['accuracy']:.4f} (strict, macro mean over every split); original scoring "
          f"{overall['accuracy_original']:.4f} = {overall['micro_correct_original']}/{overall['micro_samples']} "
          f"(micro over the classification splits, STS-B left out: the paper's figure); results in {args.out}"
          + (f" ({state.num_processes} processes shared the batches)" if state.num_processes > 1 else ""))
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} bad row(s):\n" + "\n".join(f"  {row}" for row in summary["skipped"]))
    if args.truncate is not None:
        print(_truncation_report(summary["truncated"]["rows"], 0, args.max_length, args.truncate))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "eval":
            _evaluate(args)
        else:
            from . import demo

            if args.steps < 1:
                raise UserError(f"--steps must be >= 1; got {args.steps}")
            demo.run(args.out, steps=args.steps, seed=args.seed)
    except (UserError, OSError, ValueError) as error:  # OSError: a missing file, a full disk, no permission
        if args.debug:
            raise
        print(f"lime {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
