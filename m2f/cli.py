"""Command line: `m2f train|eval|predict|convert|export|config|bench|make-synthetic|demo` (also `python -m m2f
...`).

Multi-GPU / multi-node training and evaluation: `torchrun --nproc_per_node=G [--nnodes ...] -m m2f train ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

AMP_CHOICES = ("bf16", "fp16")
DATASET_CHOICES = (
    "coco-panoptic",
    "coco-instance",
    "ade20k",
    "ade20k-panoptic",
    "ade20k-instance",
    "cityscapes",
    "cityscapes-panoptic",
    "cityscapes-instance",
    "mapillary",
    "mapillary-panoptic",
)
CHECKPOINT_CONFIG_HELP = "a config name or .json file (default: the config stored in the checkpoint)"
# The commands that run the model; they keep freed host memory for reuse (m2f.engine.host_memory).
MODEL_COMMANDS = ("train", "eval", "predict", "demo")


def _int_at_least(minimum: int, meaning: str, below: int | None = None):
    """An argparse type: the text as an int >= minimum (and < below), else the error "must be <meaning>, got
    <text>"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")
_seed = _int_at_least(0, "an integer from 0 to 2**32 - 1", below=2**32)


def _add_device(parser: argparse.ArgumentParser, amp_help: str = "mixed precision inference") -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    parser.add_argument("--amp", choices=AMP_CHOICES, help=amp_help)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="repeatable: set a config field by its dotted name, the value as JSON or plain text "
        "(solver.lr=2e-4, decoder.num_queries=200, solver.lr_steps=[9000,9500]; `m2f config NAME` lists "
        "the fields)",
    )


def _checkpoint_config(config: str | None, overrides: list[str], checkpoint: str):
    """`config` (a name or a JSON file), else the checkpoint's stored config, with the overrides."""
    from m2f.config import apply_overrides
    from m2f.engine.checkpoint import load_config_for_checkpoint, read_header

    metadata = read_header(checkpoint)[0] if config is None else {}
    return apply_overrides(load_config_for_checkpoint(config, metadata, checkpoint), overrides)


def _command_config(args: argparse.Namespace, checkpoint: str):
    """The config eval, predict, export and convert --to run with: --config as given (None: the
    checkpoint's, read there) without --set, else the config with the overrides applied."""
    return _checkpoint_config(args.config, args.overrides, checkpoint) if args.overrides else args.config


def cmd_config(args: argparse.Namespace) -> int:
    from m2f.config import apply_overrides, load_config
    from m2f.files import check_output_path, write_text_atomic

    if Path(args.source).suffix == ".safetensors":
        config = _checkpoint_config(None, args.overrides, args.source)
    else:
        config = apply_overrides(load_config(args.source), args.overrides)
    # One line per field: lists of numbers (strides, steps, pixel statistics) stay on theirs.
    text = json.dumps(config.to_dict(), indent=2)
    text = re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    check_output_path(args.out, "out", inputs=[args.source])
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from m2f.config import apply_overrides, load_config
    from m2f.engine.train import run_training

    final = run_training(
        apply_overrides(load_config(args.config), args.overrides),
        args.data_root,
        args.out or str(Path("output") / Path(args.config).stem),
        dataset_kind=args.dataset,
        resume=args.resume,
        amp=args.amp,
        max_iters=args.max_iters,
        batch_size=args.batch_size,
        image_size=args.image_size,
        grad_accum_steps=args.grad_accum,
        num_workers=args.num_workers,
        checkpoint_period=args.checkpoint_period,
        eval_period=args.eval_period,
        log_period=args.log_period,
        device=args.device,
        backbone_weights=args.backbone_weights,
        init_weights=args.init_weights,
        seed=args.seed,
        progress=not args.no_progress,
        validate=not args.no_validate,
        grad_checkpointing=args.grad_checkpointing,
    )
    from m2f.engine.distributed import is_main_process

    if is_main_process():
        print(f"final weights: {final}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from m2f.engine.evaluate import run_evaluation

    run_evaluation(
        args.checkpoint,
        args.data_root,
        config_name=_command_config(args, args.checkpoint),
        dataset_kind=args.dataset,
        split=args.split,
        output=args.output,
        device=args.device,
        amp=args.amp,
        max_images=args.max_images,
        num_workers=args.num_workers,
        validate=not args.no_validate,
        progress=not args.no_progress,
        resume=args.resume,
        tta=args.tta,
        task=args.task,
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from m2f.engine.predict import run_prediction

    written = run_prediction(
        args.images,
        args.checkpoint,
        args.out,
        config_name=_command_config(args, args.checkpoint),
        tasks=args.task,
        device=args.device,
        amp=args.amp,
        score_threshold=args.score_threshold,
        skip_existing=args.skip_existing,
        tta=args.tta,
        coco_results=args.coco_results,
        cityscapes_results=args.cityscapes_results,
        overlay=not args.no_overlay,
        category_ids=args.category_ids,
    )
    from m2f.engine.distributed import is_main_process

    if is_main_process():
        print(f"{len(written)} files in {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if (args.format is None) == (args.to is None):
        raise ValueError(
            "give --format (a foreign checkpoint to m2f) or --to (an m2f checkpoint to a format)"
        )
    if args.to is not None:
        return _convert_to_format(args)
    if args.config is None:
        raise ValueError("--format needs --config: the m2f config the weights belong to")
    from m2f.config import apply_overrides, load_config
    from m2f.convert import CLASS_HEAD_KEY, convert_to_file

    config = apply_overrides(load_config(args.config), args.overrides)
    state_dict, metadata = convert_to_file(args.src, args.format, config, args.out, classes=args.classes)
    num_classes = state_dict[CLASS_HEAD_KEY].shape[0] - 1
    named = ", named" if "class_names" in metadata else ""
    print(f"wrote {args.out} ({len(state_dict)} tensors, {num_classes} classes{named})")
    if json.loads(metadata["config"])["task"] == "panoptic" and "thing_classes" not in metadata:
        print(
            f"note: {args.out} says which classes are things and which stuff only when converted with --classes "
            "<COCO panoptic annotation JSON>; without it panoptic predictions treat every class as a thing",
            file=sys.stderr,
        )
    return 0


def _convert_to_format(args: argparse.Namespace) -> int:
    if args.classes is not None:
        raise ValueError("--classes applies to --format; with --to the class names come from the checkpoint")
    from m2f.convert import export_to_file

    exported, written = export_to_file(
        args.src, args.to, args.out, config_name=_command_config(args, args.src)
    )
    print(f"wrote {', '.join(str(path) for path in written)} ({len(exported)} tensors, {args.to} names)")
    return 0


def benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout this package lives in, else of the current directory."""
    beside_package = Path(__file__).resolve().parent.parent / "benchmarks"
    return beside_package if beside_package.is_dir() else Path("benchmarks")


def _names_a_test_file(argument: str) -> bool:
    """Whether a pytest argument is a .py file (or a test in one, file.py::name) that exists."""
    path = argument.split("::", 1)[0]
    return path.endswith(".py") and Path(path).is_file()


def cmd_export(args: argparse.Namespace) -> int:
    from m2f.engine.export import export_onnx

    result = export_onnx(
        args.checkpoint,
        args.out,
        config_name=_command_config(args, args.checkpoint),
        height=args.height,
        width=args.width,
        dynamic_size=args.dynamic_size,
    )
    checked = ", ".join(f"{batch} x 3 x {height} x {width}" for batch, height, width in result["shapes"])
    differences = ", ".join(f"{name} {value:.1e}" for name, value in result["max_difference"].items())
    print(
        f"wrote {result['path']}; onnxruntime against PyTorch on images {checked}: {differences} (relative)"
    )
    if result["max_difference_every_key_visible"] is not None:
        visible = ", ".join(f"{k} {v:.1e}" for k, v in result["max_difference_every_key_visible"].items())
        print(
            f"  with every masked-attention key visible: {visible}; the differences above come from mask logits "
            "within rounding of the threshold"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"no benchmarks/ folder at {folder.resolve()} (run from the source checkout)")
    # Files named first are what pytest runs; the folder beside them would run every benchmark. Only the
    # leading arguments count: a file after an option may be its value (--ignore FILE).
    named_first = bool(args.pytest_args) and _names_a_test_file(args.pytest_args[0])
    paths = [] if named_first else [str(folder)]
    return subprocess.call([sys.executable, "-m", "pytest", *paths, *args.pytest_args])


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from m2f import data

    make = {
        "coco": data.make_synthetic,
        "ade20k": data.make_synthetic_ade20k,
        "cityscapes": data.make_synthetic_cityscapes,
        "mapillary": data.make_synthetic_mapillary,
    }[args.layout]
    root = make(
        args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed
    )
    print(f"synthetic dataset written to {root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from m2f.engine.demo import run_demo

    run_demo(args.out, max_iters=args.max_iters, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2f", description="Mask2Former on fused kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a config (torchrun for several GPUs/nodes)")
    train.add_argument(
        "--config",
        required=True,
        help="a name from m2f.config.CONFIG_NAMES, or a config .json file (m2f config)",
    )
    _add_overrides(train)
    train.add_argument(
        "--data-root", required=True, help="dataset root (COCO layout, or ADEChallengeData2016)"
    )
    train.add_argument("--dataset", choices=DATASET_CHOICES, help="default: the config's dataset and task")
    train.add_argument("--out", help="output folder (default: output/<config name or file stem>)")
    train.add_argument(
        "--resume", action="store_true", help="continue from OUT/last_checkpoint if there is one"
    )
    train.add_argument(
        "--max-iters", type=_positive_int, help="default: the config's (lr steps scale with it)"
    )
    train.add_argument("--batch-size", type=_positive_int, help="global batch (default: the config's)")
    train.add_argument(
        "--image-size",
        type=_positive_int,
        help="crop size: LSJ's, or the semantic recipe's and then its test size too (default: the config's)",
    )
    train.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps")
    train.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute the backbone's and pixel decoder's activations in the backward pass: less memory, "
        "the same gradients, for one more forward pass of those parts",
    )
    train.add_argument(
        "--num-workers", type=_non_negative_int, default=4, help="data loader processes per rank"
    )
    train.add_argument(
        "--checkpoint-period",
        type=_positive_int,
        default=5000,
        help="checkpoint every N iterations (and at the end)",
    )
    train.add_argument(
        "--eval-period",
        type=_non_negative_int,
        default=0,
        help="evaluate on the val split every N iterations and at the end (default 0: never)",
    )
    train.add_argument(
        "--log-period", type=_positive_int, default=20, help="metrics.csv row every N iterations"
    )
    train.add_argument("--backbone-weights", help="local timm backbone weights (.safetensors or torch file)")
    train.add_argument(
        "--init-weights",
        help="fine-tune from an m2f model checkpoint (.safetensors, e.g. from m2f convert); a class head for "
        "another number of classes starts afresh",
    )
    train.add_argument(
        "--seed", type=_seed, default=0, help="seed of the weights' init and the data stream (0 to 2**32 - 1)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the dataset check (annotations, classes, image files)",
    )
    _add_device(
        train,
        "mixed precision (fp16 uses a gradient scaler; default: for configs that train with AMP, bf16 on a GPU that has it, else fp16; none on CPU)",
    )
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint (PQ, AP or mIoU) and write JSON")
    evaluate.add_argument("--checkpoint", required=True, help="a .safetensors weights file")
    evaluate.add_argument(
        "--data-root", required=True, help="dataset root (COCO layout, or ADEChallengeData2016)"
    )
    evaluate.add_argument("--config", help=CHECKPOINT_CONFIG_HELP)
    _add_overrides(evaluate)
    evaluate.add_argument("--dataset", choices=DATASET_CHOICES, help="default: the checkpoint's / config's")
    evaluate.add_argument("--split", default="val", help="default: val")
    evaluate.add_argument("--output", help="results JSON (default: beside the checkpoint)")
    evaluate.add_argument("--max-images", type=_positive_int, help="evaluate only the first N images")
    evaluate.add_argument(
        "--task",
        choices=("panoptic", "instance", "semantic"),
        help="default: the dataset's; semantic on coco-panoptic: the mIoU of a panoptic model, as Mask2Former "
        "reports it (ground truth from the panoptic annotations)",
    )
    evaluate.add_argument(
        "--num-workers", type=_non_negative_int, default=2, help="data loader processes per rank (default 2)"
    )
    evaluate.add_argument("--no-validate", action="store_true", help="skip the dataset check")
    evaluate.add_argument(
        "--tta",
        action="store_true",
        help="semantic segmentation with Mask2Former's multi-scale (0.5-1.75 x the test size) and flip test",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument(
        "--resume",
        action="store_true",
        help="reuse the parts an interrupted run of the same evaluation left in <output>.parts/",
    )
    _add_device(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    predict = commands.add_parser(
        "predict", help="overlay PNGs and raw predictions for image files (torchrun shares them out)"
    )
    predict.add_argument("images", nargs="+", help="image files, or folders of them")
    predict.add_argument("--checkpoint", required=True, help="a .safetensors weights file")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--config", help=CHECKPOINT_CONFIG_HELP)
    _add_overrides(predict)
    predict.add_argument(
        "--task",
        action="append",
        choices=("panoptic", "instance", "semantic"),
        help="repeatable; default: the config's",
    )
    predict.add_argument("--score-threshold", type=float, default=0.5, help="instances drawn from this score")
    predict.add_argument(
        "--skip-existing",
        action="store_true",
        help="do not predict an image again whose output files are all in --out (resumes a stopped run)",
    )
    predict.add_argument(
        "--tta",
        action="store_true",
        help="the semantic task with Mask2Former's multi-scale (0.5-1.75 x the test size) and flip test",
    )
    predict.add_argument(
        "--no-overlay",
        action="store_true",
        help="write the raw predictions only, no overlay pictures (faster and far smaller for many images)",
    )
    predict.add_argument(
        "--coco-results",
        metavar="IMAGES_JSON",
        help="also write COCO results files (panoptic_results.json, instances_results.json) for the images a "
        "COCO JSON lists (e.g. image_info_test-dev2017.json): only those among the inputs are predicted, and "
        "all must be there",
    )
    predict.add_argument(
        "--cityscapes-results",
        action="store_true",
        help="also write the instance task's Cityscapes results (OUT/cityscapes_instance_results/: a .txt per "
        "image and the mask PNGs), what cityscapesscripts' evaluation and the benchmark's server read",
    )
    predict.add_argument(
        "--category-ids",
        action="store_true",
        help="the semantic labels as the dataset's category ids, in <image>.semantic_category_ids.png instead of "
        ".semantic_labels.png (for ADE20K: class index + 1, what its test server reads)",
    )
    _add_device(predict)
    predict.set_defaults(func=cmd_predict)

    convert = commands.add_parser(
        "convert", help="convert transformers/detectron2/mmdet weights to m2f (--format) or back (--to)"
    )
    convert.add_argument(
        "src",
        help="with --format: a checkpoint file or Hugging Face model directory (sharded or not); with --to: "
        "an m2f .safetensors checkpoint",
    )
    formats = ("transformers", "detectron2", "mmdet")  # m2f.convert.FORMATS, without importing torch
    convert.add_argument("--format", choices=formats, help="the format of src, converted to m2f")
    convert.add_argument(
        "--to",
        choices=formats,
        help="the format src (m2f) is written in: a transformers model directory, a detectron2 .pkl or an "
        "mmdet .pth",
    )
    convert.add_argument(
        "--config",
        help="the m2f config the weights belong to, a name or a .json file (needed with --format; with --to: "
        "default the stored one)",
    )
    _add_overrides(convert)
    convert.add_argument(
        "--out", required=True, help="output: .safetensors (--format), a folder, .pkl or .pth (--to)"
    )
    convert.add_argument(
        "--classes",
        help="class names when the checkpoint has none (detectron2) or to replace its own: 'ade20k', "
        "'cityscapes', 'cityscapes-instance', 'mapillary', a COCO annotation JSON (names and thing classes), a "
        "JSON list or a text file with one name per line",
    )
    convert.set_defaults(func=cmd_convert)

    export = commands.add_parser(
        "export",
        help="write a checkpoint's model as ONNX (images in, class and mask logits out), checked in onnxruntime",
    )
    export.add_argument("--checkpoint", required=True, help="a .safetensors weights file")
    export.add_argument("--out", required=True, help="output .onnx file")
    export.add_argument("--config", help=CHECKPOINT_CONFIG_HELP)
    _add_overrides(export)
    export.add_argument(
        "--height", type=_positive_int, default=512, help="example image height (default 512)"
    )
    export.add_argument("--width", type=_positive_int, default=512, help="example image width (default 512)")
    export.add_argument(
        "--dynamic-size",
        action="store_true",
        help="a graph for any batch and image size from 64 pixels (default: one image of --height x --width)",
    )
    export.set_defaults(func=cmd_export)

    config = commands.add_parser(
        "config",
        help="print a config as JSON (or write it with --out): edit it and train with --config FILE.json",
    )
    config.add_argument("source", help="a config name, a config .json file or an m2f .safetensors checkpoint")
    _add_overrides(config)
    config.add_argument("--out", help="write the JSON to this file instead of printing it")
    config.set_defaults(func=cmd_config)

    bench = commands.add_parser(
        "bench",
        help="run pytest benchmarks/, or the benchmark files named first (every argument goes to pytest)",
        description="Runs pytest on benchmarks/, or on the benchmark files given first "
        "(m2f bench benchmarks/bench_point_loss.py -k pairwise); every argument goes to pytest (e.g. -k point).",
    )
    bench.set_defaults(func=cmd_bench)

    synthetic = commands.add_parser(
        "make-synthetic",
        help="write the synthetic dataset (COCO, ADE20K, Cityscapes or Mapillary Vistas layout)",
    )
    synthetic.add_argument("--out", required=True, help="dataset root to write")
    synthetic.add_argument("--num-train", type=int, default=64, help="train images (default 64)")
    synthetic.add_argument("--num-val", type=int, default=16, help="val images (default 16)")
    synthetic.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    synthetic.add_argument("--seed", type=_non_negative_int, default=0, help="default 0")
    layouts = synthetic.add_mutually_exclusive_group()
    layouts.add_argument(
        "--ade20k",
        dest="layout",
        action="store_const",
        const="ade20k",
        default="coco",
        help="ADE20K layout (semantic, panoptic, instance)",
    )
    layouts.add_argument(
        "--cityscapes",
        dest="layout",
        action="store_const",
        const="cityscapes",
        help="Cityscapes layout (semantic, panoptic, instance)",
    )
    layouts.add_argument(
        "--mapillary",
        dest="layout",
        action="store_const",
        const="mapillary",
        help="Mapillary Vistas layout (semantic, panoptic)",
    )
    synthetic.set_defaults(func=cmd_make_synthetic)

    demo = commands.add_parser("demo", help="synthetic data -> train demo-tiny on CPU -> PQ before/after")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--max-iters", type=_positive_int, help="default: the demo's tuned value")
    demo.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: 1)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `m2f` console script. Errors from bad input are printed as one line (exit 2)."""
    from m2f.data import DatasetError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.pytest_args = extra[1:] if extra[:1] == ["--"] else extra  # `m2f bench -- -k point` too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in MODEL_COMMANDS:
        from m2f.engine.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    try:
        with _terminate_as_exit():
            return args.func(args)
    except (ValueError, OSError, DatasetError) as error:  # OSError: a path that cannot be read or written
        print(f"m2f {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"m2f {args.command}: training stopped: {error}", file=sys.stderr)
        return 3


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (what schedulers, torchrun and `kill` send) raises SystemExit(143) instead of ending the
    process on the spot, so that a file being written is cleaned up and the process group left."""

    def exit_on_terminate(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
