"""The command line: ``python -m peagle_ext COMMAND [options]``, one module per command (``COMMANDS``).

Every mistake in the arguments ends in one line, ``<command>: error: argument --x: what is
wrong``, and exit status 2, before any work starts; output paths are checked the same way.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

# command -> (module under peagle_ext.cli that holds main(argv), one-line description)
COMMANDS = {
    "demo": ("demo", "build a P-EAGLE BlockMask, check it against create_block_mask, print the figures"),
    "info": ("info", "torch version, CUDA, compiled kernels and available backends"),
    "bench": ("bench", "benchmark every backend against create_block_mask (see --help)"),
    "train-demo": ("train_demo", "train a tiny P-EAGLE draft on synthetic data and save a checkpoint"),
    "train": ("train", "train a P-EAGLE or EAGLE-3 draft for a transformers model in a time budget (see --help)"),
    "eval": ("evaluate", "speculative decoding with a draft against a target: acceptance and speed (see --help)"),
}


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line and raises UsageError instead of exiting."""

    def error(self, message: str):
        raise UsageError(message)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        # argparse hands "--x=--" to a one-value option as a list, without calling its type.
        for action in self._actions:
            if action.type is not None and action.nargs is None and isinstance(getattr(parsed, action.dest), list):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one value, "
                           f"got {getattr(parsed, action.dest)!r}")
        return parsed


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives each option's default, where it has one and its help does not already say it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser_for(command: str) -> Parser:
    # allow_abbrev=False: an option is its whole name (--budget-minute is not --budget-minutes).
    return Parser(prog=f"python -m peagle_ext {command}", description=COMMANDS[command][1], allow_abbrev=False,
                  formatter_class=HelpFormatter)


# The largest count or size any option takes (the mask API's bound on positions and sizes).
MAX_OPTION_INT = 2**31 - 1


def int_at_least(minimum: int, maximum: int = MAX_OPTION_INT):
    """An argparse type: an int in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also for more digits than Python converts
            raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


def check_memory(option: str, needed_bytes: int, device: str, what: str) -> None:
    """A usage error naming ``option`` when ``what`` would need more memory than ``device`` has free."""
    import torch

    from .._inputs import available_memory_bytes

    have = available_memory_bytes(torch.device(device))
    if needed_bytes > have:
        raise UsageError(f"argument {option}: {what} would need about {needed_bytes / 2**30:.1f} GiB, more than "
                         f"the {have / 2**30:.1f} GiB free on {device}")


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_device_option(parser: Parser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, choices=["auto", "cpu", "cuda"],
                        help=f"where to run; auto = cuda when a GPU is visible (default {default})")


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available; 'cuda' without a GPU is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for but no CUDA device is available here")
    return device


def check_path(option: str, path) -> str:
    """A usage error unless ``path`` names a path: an empty or blank string names none, yet
    ``os.path`` and ``pathlib`` read it as the current directory, so writing "there" would replace
    files the user never named; a NUL byte no file system accepts. Every path option of every
    command goes through here (the write checks below call it first). Returns ``path``."""
    if not isinstance(path, str) or not path.strip():
        raise UsageError(f"argument {option}: must name a path, got {path!r} (an empty path would be the "
                         "current directory)")
    if "\0" in path:
        raise UsageError(f"argument {option}: holds a NUL byte, which no path can: {path[:40]!r}")
    return path


def check_distinct_files(outputs: dict[str, str | None], inputs: list[tuple[str, str]] = ()) -> None:
    """A usage error when an output file (option -> path; None: not asked for) is one of the
    ``inputs`` ((option, path) pairs: files the run reads) or another output: the run would
    overwrite what it reads, or one result with another."""
    seen = {os.path.realpath(path): option for option, path in inputs}
    for option, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"argument {option}: {path} is the file {seen[real]} names; give another path")
        seen[real] = option


def check_writable(option: str, path: str) -> None:
    """Fail now, not after the work, when ``path`` cannot be written as a file.

    Opens it for appending (which truncates nothing) and removes it again if it did not exist,
    so the check is the real one, also for root on read-only file systems.
    """
    check_path(option, path)
    if os.path.isdir(path):
        raise UsageError(f"argument {option}: {path} is a directory, expected a file path")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise UsageError(f"argument {option}: cannot write {path} ({error.strerror or error})") from None
    if not existed:
        os.remove(path)


def nearest_existing_directory(path: str) -> str:
    """``path`` if it is a directory, else its nearest ancestor that exists (what a mkdir -p of it
    creates directories in)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def check_directory_writable(option: str, path: str, needed_bytes: int = 0) -> None:
    """Fail now, not after the work, when files cannot be written in the directory ``path`` (or
    created where it is to be created), or its file system has less than ``needed_bytes`` free.

    Creates and removes a temporary directory there: the real check, also for root on read-only
    file systems."""
    import shutil
    import tempfile

    check_path(option, path)
    where = nearest_existing_directory(path)
    try:
        tempfile.TemporaryDirectory(dir=where).cleanup()
    except OSError as error:
        raise UsageError(f"argument {option}: cannot write in {where} ({error.strerror or error})") from None
    free = shutil.disk_usage(where).free
    if free < needed_bytes:
        raise UsageError(f"argument {option}: {where} has {free / 2**20:.1f} MiB free, the output needs about "
                         f"{needed_bytes / 2**20:.1f} MiB")


def check_checkpoint_out(option: str, out: str, overwrite: bool) -> None:
    """A checkpoint directory to write: new, empty, or (with ``overwrite``) a draft checkpoint,
    whose two files are replaced (anything else in it is kept). Never an existing file, never a
    directory of other things (another model's config.json and weights, say), never an empty path."""
    import json

    from ..draft.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    check_path(option, out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"argument {option}: {out} is a file, expected a checkpoint directory")
    try:
        if not os.path.isdir(out) or not os.listdir(out):
            return
    except OSError as error:
        raise UsageError(f"argument {option}: cannot list {out} ({error.strerror or error})") from None
    try:
        with open(os.path.join(out, CONFIG_NAME), "rb") as file:
            config = json.loads(file.read(1 << 20))
        is_checkpoint = (isinstance(config, dict) and "speculators_model_type" in config
                         and os.path.isfile(os.path.join(out, WEIGHTS_NAME)))
    except (OSError, ValueError, RecursionError):
        is_checkpoint = False
    if not is_checkpoint:
        raise UsageError(f"argument {option}: {out} holds other files and is not a draft checkpoint ({CONFIG_NAME} "
                         f"with speculators_model_type, and {WEIGHTS_NAME}); give a new or empty directory")
    if not overwrite:
        raise UsageError(f"argument {option}: {out} already exists; pass --overwrite to replace it")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"python -m peagle_ext: error: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: python -m peagle_ext {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"{__name__}.{COMMANDS[argv[0]][0]}")
    try:
        return module.main(argv[1:])
    except UsageError as error:
        print(f"python -m peagle_ext {argv[0]}: error: {error} (see --help)", file=sys.stderr)
        return 2
