"""The ``selfnpo`` command. Every option comes from a typed config dataclass and its help text."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

from .errors import SelfNPOError

EXIT_USER_ERROR = 2


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field, with its type, default, choices and help."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=f.default, help=help_)
            continue
        kw = {
            "type": type(f.default),
            "default": f.default,
            "help": f"{help_} (default: {f.default!r})",
        }
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def config_from_args(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def _cmd_train(ns: argparse.Namespace) -> None:
    from .training.config import TrainConfig
    from .training.loop import train

    res = train(config_from_args(TrainConfig, ns), progress=not ns.quiet)
    print(f"offset written to {res.offset_path} ({res.steps} steps, {res.wall_time_s:.1f} s)")


def _cmd_generate(ns: argparse.Namespace) -> None:
    from .generate import GenerateConfig, generate

    jobs = generate(config_from_args(GenerateConfig, ns), progress=not ns.quiet)
    print(f"{len(jobs)} images in {ns.output_dir}")


def _cmd_pretrain(ns: argparse.Namespace) -> None:
    from .world.pretrain import PretrainConfig, pretrain

    path = pretrain(config_from_args(PretrainConfig, ns), progress=not ns.quiet)
    print(f"world model written to {path}")


def _cmd_demo(ns: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, ns), progress=(lambda s: None) if ns.quiet else print)


def _cmd_pairs(ns: argparse.Namespace) -> None:
    from .preference.build import PairsConfig, build_pairs

    path = build_pairs(config_from_args(PairsConfig, ns), progress=not ns.quiet)
    print(f"preference pairs written to {path}")


def _cmd_import_pickapic(ns: argparse.Namespace) -> None:
    from .preference.pickapic import PickapicConfig, convert_pickapic

    print(f"preference pairs written to {convert_pickapic(config_from_args(PickapicConfig, ns))}")


def _cmd_merge(ns: argparse.Namespace) -> None:
    from .algebra import MergeConfig, merge_offsets, parse_offsets

    cfg = config_from_args(MergeConfig, ns).validate()
    out = merge_offsets(cfg.model, parse_offsets(cfg.offsets), cfg.output_dir, dtype=cfg.dtype)
    print(f"merged model written to {out}")


def _cmd_sweep(ns: argparse.Namespace) -> None:
    from .sweep import SweepConfig, run_sweep

    run_sweep(config_from_args(SweepConfig, ns), progress=(lambda s: None) if ns.quiet else print)


def _cmd_score(ns: argparse.Namespace) -> None:
    from .scoring.run import ScoreConfig, run_score

    cfg = config_from_args(ScoreConfig, ns)
    run_score(cfg, progress=(lambda s: None) if ns.quiet else print, progress_bar=not ns.quiet)
    print(f"scores written to {cfg.output_dir}")


def _cmd_compare(ns: argparse.Namespace) -> None:
    from .compare.run import CompareConfig, run_compare

    run_compare(
        config_from_args(CompareConfig, ns),
        progress=(lambda s: None) if ns.quiet else print,
        progress_bar=not ns.quiet,
    )


COMMANDS: dict[str, tuple[str, str, Callable[[argparse.Namespace], None]]] = {
    "pairs": (
        "selfnpo.preference.build:PairsConfig",
        "build preference pairs for a model by reward feedback (for dpo / dpo_npo)",
        _cmd_pairs,
    ),
    "import-pickapic": (
        "selfnpo.preference.pickapic:PickapicConfig",
        "convert a local Pick-a-Pic parquet copy into a preference pair folder",
        _cmd_import_pickapic,
    ),
    "train": (
        "selfnpo.training.config:TrainConfig",
        "train a Self-NPO negative offset (or a baseline)",
        _cmd_train,
    ),
    "generate": (
        "selfnpo.generate:GenerateConfig",
        "generate images with NPO guidance",
        _cmd_generate,
    ),
    "score": (
        "selfnpo.scoring.run:ScoreConfig",
        "score generated images with PickScore, HPSv2.1, ImageReward, LAION aesthetic, CLIP score",
        _cmd_score,
    ),
    "compare": (
        "selfnpo.compare.run:CompareConfig",
        "compare guidance methods and NPO offsets at the same prompts and seeds: table, win rates, report",
        _cmd_compare,
    ),
    "demo": (
        "selfnpo.demo:DemoConfig",
        "the main job: Self-NPO on the embedded world model, with a report",
        _cmd_demo,
    ),
    "pretrain": (
        "selfnpo.world.pretrain.config:PretrainConfig",
        "reproduce the embedded world model from scratch",
        _cmd_pretrain,
    ),
    "merge": (
        "selfnpo.algebra:MergeConfig",
        "merge weight offsets into a standalone diffusers model folder",
        _cmd_merge,
    ),
    "sweep": (
        "selfnpo.sweep:SweepConfig",
        "evaluate a grid of (alpha, beta, guidance scale) on the world model, with heat maps",
        _cmd_sweep,
    ),
}


def _config_class(spec: str) -> type:
    import importlib

    mod, name = spec.split(":")
    return getattr(importlib.import_module(mod), name)


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfnpo",
        description="Self-NPO: train a negative weight offset for classifier-free guidance, and use it.",
    )
    parser.add_argument("--version", action="version", version=f"selfnpo {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (spec, help_, _) in COMMANDS.items():
        cls = _config_class(spec)
        p = sub.add_parser(name, help=help_, description=(cls.__doc__ or help_).strip().splitlines()[0])
        add_config_args(p, cls)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING, format="selfnpo: %(message)s")
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()


def _check_settings(ns: argparse.Namespace) -> None:
    """Validate the command's settings on their own (no model, no files), as early as possible."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    cls = _config_class(COMMANDS[ns.command][0])
    cfg = config_from_args(cls, ns)
    if hasattr(cfg, "validate"):
        cfg = cfg.validate()
    if hasattr(cfg, "resolved"):
        cfg.resolved()


def _oom_error() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated


_RESUMABLE = ("train", "generate", "sweep", "pretrain")


def _expected_failure(command: str, e: BaseException) -> str | None:
    """The one line for a failure a user can cause or fix (bad input, no memory, no disk), or None.

    Every expected failure becomes one line here; anything else is a bug and keeps its traceback.
    """
    if isinstance(e, SelfNPOError):
        return str(e)
    if isinstance(e, MemoryError | _oom_error()) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e)
    ):
        return "out of memory; lower --batch-size or --resolution"
    if isinstance(e, OSError) and e.errno is not None:
        where = f" {e.filename}" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"disk full while writing{where}"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write{where} ({e.strerror}); choose another output folder"
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.EIO):
            return f"cannot use{where} ({e.strerror})"
    return None


def _interrupted(command: str, e: KeyboardInterrupt) -> str:
    what = "terminated" if isinstance(e, Terminated) else "interrupted"
    if command in _RESUMABLE:
        return f"selfnpo {command}: {what}; run the same command with --resume to continue"
    if command == "demo":
        return f"selfnpo {command}: {what}; run it again with --overwrite"
    return f"selfnpo {command}: {what}; nothing was written"


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line to stderr and return exit code 2."""
    ns = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    # Ctrl-C raises KeyboardInterrupt even if an imported library installed its own SIGINT handler
    previous = (
        (signal.signal(signal.SIGTERM, _on_sigterm), signal.signal(signal.SIGINT, signal.default_int_handler))
        if in_main
        else None
    )
    try:
        _check_settings(ns)  # a typo is reported before diffusers and transformers are imported
        _quiet_libraries()
        COMMANDS[ns.command][2](ns)
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        print("\n" + _interrupted(ns.command, e), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        line = _expected_failure(ns.command, e)
        if line is None:
            raise
        print(f"selfnpo {ns.command}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if in_main:  # a handler installed outside Python reads back as None: leave ours then
            for sig, handler in zip((signal.SIGTERM, signal.SIGINT), previous, strict=True):
                if handler is not None:
                    signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
