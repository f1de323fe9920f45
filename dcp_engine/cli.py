"""The ``dcp-engine`` command: inspect, verify, export and clean checkpoints outside
training, in one process, without a process group, and adopt checkpoints of stock DCP.

Exit codes: 0 success; 1 ``verify`` found a bad file; 2 an error (one line on stderr,
never a traceback).

This module only parses: it imports neither torch nor the engine, so ``--help`` and
``--version`` answer at once; the commands are in ``commands.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import CheckpointError
from .location import Location, as_location
from .relayout import LAYOUTS, STOCK
from .units import DTYPE_NAMES


class Fail(Exception):
    """A user-facing error: its message is the one line printed."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        from . import commands

        return int(getattr(commands, f"cmd_{args.command}")(args) or 0)
    except (Fail, CheckpointError, OSError, ValueError, TypeError) as e:
        print(f"dcp-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug of ours or of a library: still one line, never a traceback
        print(f"dcp-engine {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dcp-engine")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcp-engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"dcp-engine {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    where = "a path or a URL (s3://, gs://, http(s)://)"

    ls = sub.add_parser("ls", help="committed checkpoints of an experiment or a root of them")
    ls.add_argument("path", type=_location, help=f"an experiment or a directory of them: {where}")
    ls.add_argument("--json", action="store_true", help="one JSON document")

    ins = sub.add_parser("inspect", help="keys, tensors, bytes, dtypes of a checkpoint")
    ins.add_argument("checkpoint", type=_location, help="a checkpoint, an alias or an experiment")
    ins.add_argument("--tensors", action="store_true", help="every tensor, shape and dtype")

    ver = sub.add_parser("verify", help="every file against its size and digest (exit 1: bad)")
    ver.add_argument("path", type=_location, help="a checkpoint or an experiment")
    _progress_flag(ver)

    exp = sub.add_parser(
        "export", help="one torch.load-able file, a safetensors file, or a stock DCP directory"
    )
    exp.add_argument("checkpoint", type=_location, help="a checkpoint, an alias or an experiment")
    exp.add_argument("out", type=_location, help="the file (or, --format dcp, directory) to write")
    exp.add_argument("--key", help="one entry only, e.g. teacher")
    exp.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="cast floating tensors")
    exp.add_argument(
        "--format",
        choices=["torch", "safetensors", "dcp"],
        default="torch",
        help="torch.save file (default), safetensors file, or a stock DCP directory",
    )
    _progress_flag(exp)

    gc = sub.add_parser("gc", help="apply retention policies to an experiment")
    gc.add_argument("experiment", type=_location, help=f"the experiment: {where}")
    gc.add_argument("--keep-top-k", type=int, metavar="K", help="keep the K best by --monitor")
    gc.add_argument("--monitor", help="default: checkpoint.monitor of config.yaml")
    gc.add_argument("--mode", choices=["min", "max"], help="which end of --monitor is best")
    gc.add_argument("--keep-last-n", type=int, metavar="N", help="keep the N newest")
    gc.add_argument("--keep-every-n-steps", type=int, metavar="N", help="keep steps divisible by N")
    gc.add_argument(
        "--keep-every-n-epochs", type=int, metavar="N", help="keep the last of every N-th epoch"
    )
    gc.add_argument("--dry-run", action="store_true", help="list, delete nothing")

    avg = sub.add_parser("average", help="mean weights of the top-k checkpoints")
    avg.add_argument("experiment", type=_location, help=f"the experiment: {where}")
    avg.add_argument("out", type=_location, help="the torch.load-able file to write")
    avg.add_argument("--top-k", type=int, default=10, metavar="K", help="how many (default 10)")
    avg.add_argument("--key", help="one entry only, e.g. teacher")
    avg.add_argument("--monitor", help="default: checkpoint.monitor of config.yaml")
    avg.add_argument("--mode", choices=["min", "max"], help="which end of --monitor is best")
    _progress_flag(avg)

    ado = sub.add_parser(
        "adopt", help="commit a checkpoint written by stock DCP (dcp.save) into an experiment"
    )
    ado.add_argument(
        "source",
        metavar="DCP_DIR",
        type=_location,
        help=f"the directory dcp.save wrote (.metadata and its files): {where}",
    )
    ado.add_argument(
        "experiment",
        type=_location,
        help=f"the experiment to commit it into (created if needed): {where}",
    )
    ado.add_argument("--step", type=int, required=True, help="its step in the experiment")
    ado.add_argument("--epoch", type=int, help="its epoch, if known")
    ado.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=_metric,
        help="a metric of it (repeatable), e.g. val_loss=0.31",
    )
    ado.add_argument(
        "--move",
        action="store_true",
        help="rename the files into the experiment instead of copying them "
        "(one local file system; DCP_DIR is removed if that leaves it empty)",
    )
    ado.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=STOCK,
        help="how DCP_DIR's keys become entries: stock (as dcp.save wrote them; default) "
        "or torchtitan (torchtitan's step-N/: the model's parameters, written at the top "
        "level, go under 'model', where dcp_engine.integrations.torchtitan loads them)",
    )
    _progress_flag(ado)
    return p


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: only on a terminal)",
    )


def _metric(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not NAME=NUMBER")


def _location(text: str) -> Location:
    """A path or a URL argument (``s3://...``); a URL fsspec cannot serve is a usage error."""
    try:
        return as_location(text)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
