"""One process or many under `torchrun`: who this process is, the collectives the stages need,
and agreement on failures, so that the same code runs in one process and on N ranks.

torchrun starts N copies of a command and tells each one who it is through its environment:
RANK (0..N-1 over every node), WORLD_SIZE (N), LOCAL_RANK (its index on this node, which picks
its GPU), MASTER_ADDR and MASTER_PORT (where rank 0 listens). `init` reads them and joins the
process group: gloo when the ranks compute on the CPU, NCCL when they use CUDA (rank r of a node
then uses cuda:LOCAL_RANK; agreement and the object collectives then run on a gloo group beside
it). A process started any other way, or by torchrun with one process, is
a world of one: no process group, and every helper below is a no-op (a gather returns a list of
one), so there is a single code path.

    def main():                                   # a console script's entry point
        with exit_together():                     # ranks that fail together exit together
            run_cli(app)                          # shared/errors.py

    # in a command:
    with init("cpu") as world:                    # leaving the block is the last meeting point
        mine = work(world.rank)
        everyone = world.all_gather_object(mine)  # a meeting point
        if world.is_main:
            print(summary(everyone))              # only rank 0 prints progress and summaries

Failure agreement. A collective waits for every rank, so a rank that raised between two meeting
points would leave the others waiting in the next one until the timeout. So every meeting point
(`agree`, `barrier`, the object collectives, leaving the `with` block) starts by agreeing: each
rank says whether it failed (one small all-reduce, cheap enough to run every training step),
and when one did, every rank learns which one and why (one line each) and stops there: the
failing rank with its own error, the others with `RankFailed` naming it. The `with` block is
the outermost frame of a rank's work: an exception escaping it is shared at the meeting point
the other ranks reach next. `RankFailed` is a `shared.errors.UserError` when the failing rank's
error was one (so `run_cli` prints one line, exit 2, on every rank); another rank's internal
error (a bug: its traceback is on that rank) is one line and exit 1 through `exit_together`.

Exiting. torchrun stops every rank (SIGTERM) as soon as one exits with a non-zero code, so a rank
that exits first would cut the others short (their line unprinted, their exit code lost).
`exit_together`, the outermost frame of a CLI's main, makes the ranks that leave with a non-zero
code wait for each other and then exit at once, each with its own code; it also leaves the
process group at the end.

The raw tensor collectives (`all_reduce`, `all_gather`) do not agree first: they are for hot
loops (data-parallel gradients) in which every rank runs the same code on the same schedule and
cannot fail alone; put an `agree` before such a stretch.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.errors import EXIT_USAGE, UserError, error_line, fail, first_line

DEFAULT_TIMEOUT_S = 1800.0  # how long a rank waits for the others in a collective (as torch)
EXIT_RANK_FAILED = 1  # another rank's internal error; user errors keep shared.errors' exit 2
# OSErrors that shared.errors.run_cli reports as one line and exit 2 (a full disk, a path the
# user chose that cannot be used): reported to the other ranks as user errors too
_USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                          errno.ENOTDIR})


class RankFailed(Exception):
    """Another rank failed: raised on every rank but the failing one, at the meeting point."""


class RankUserError(RankFailed, UserError):
    """Another rank failed on bad input (a UserError there): one line and exit 2 here too."""


@dataclass(frozen=True)
class _Report:
    rank: int
    message: str
    user: bool  # a user error (exit 2) rather than an internal one


@dataclass
class World:
    """This process among the ranks torchrun started (`rank` of `world_size`; `local_rank` on its
    node). A world of one (the default) has no process group and its collectives are no-ops."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" once the process group is joined
    # where agreement and the object collectives run: gloo on the CPU (a group of its own beside
    # NCCL, so that pickled objects never pass through GPU memory); None: the default group
    _cpu_group: Any = field(default=None, repr=False)
    _meeting: bool = field(default=True, repr=False)  # False after a failure or the last meeting
    _failed: bool = field(default=False, repr=False)  # the ranks stopped on a failure: for good

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that owns shared outputs and prints progress and summaries."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> World:
        """The process as torchrun describes it; a world of one when not launched by torchrun."""
        size = _env_int(environ, "WORLD_SIZE", 1)
        if size <= 1:
            return cls()
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            fail(f"WORLD_SIZE is {size} but {' and '.join(missing)} is not set; start the command "
                 "with torchrun (e.g. torchrun --nproc-per-node 2 --no-python train-sae ...)")
        rank = _env_int(environ, "RANK", 0)
        local_rank = _env_int(environ, "LOCAL_RANK", rank)
        if not 0 <= rank < size:
            fail(f"RANK {rank} is outside 0..{size - 1} (WORLD_SIZE {size}); start the command "
                 "with torchrun")
        return cls(rank=rank, world_size=size, local_rank=local_rank)

    def device(self, kind: str) -> str:
        """The device this rank computes on for a device kind ("cpu" or "cuda"): each rank of a
        node takes its own GPU, cuda:LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if kind == "cuda" and self.distributed else kind

    # --- meeting points: every rank must call these, in the same order ----------------------
    def agree(self) -> None:
        """Return once every rank got here without failing; otherwise raise `RankFailed` naming
        the (first) failing rank. Also a barrier."""
        report = self._exchange(None)
        if report is not None:
            raise _rank_failed(report, self)

    def barrier(self) -> None:
        self.agree()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        self.agree()
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._collective(torch.distributed.all_gather_object, out, obj, group=self._cpu_group)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank `dst` (None elsewhere)."""
        self.agree()
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        self._collective(torch.distributed.gather_object, obj, out, dst=dst,
                         group=self._cpu_group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (the others pass anything, e.g. None)."""
        self.agree()
        if not self.distributed:
            return obj
        box = [obj]
        self._collective(torch.distributed.broadcast_object_list, box, src=src,
                         group=self._cpu_group)
        return box[0]

    # --- raw tensor collectives (no agreement first; see the module docstring) ---------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `t` over the ranks in place ("sum", "max" or "min") and return it."""
        if self.distributed:
            ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                   "min": torch.distributed.ReduceOp.MIN}
            self._collective(torch.distributed.all_reduce, t, op=ops[op])
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (the same shape on every rank) concatenated along dim 0, in rank
        order."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._collective(torch.distributed.all_gather, parts, t.contiguous())
        return torch.cat(parts)

    # --- the rank's work as a block --------------------------------------------------------
    def __enter__(self) -> World:
        """A block of work every rank runs; another may follow one that ended well."""
        self._meeting = not self._failed
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: object) -> None:
        """Leaving the block is the last meeting point. An exception escaping it is shared with
        the other ranks (they stop at their next meeting point) and goes on up unchanged."""
        try:
            if error is None:
                self.agree()
            elif self.distributed and self._meeting and not isinstance(error, RankFailed):
                with contextlib.suppress(Exception):  # the group itself broke: nobody to tell
                    self._exchange(error)
        finally:
            self._meeting = False

    def close(self) -> None:
        """Leave the process group (a world of one has none)."""
        global _JOINED
        self._meeting = False
        if self.backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.backend = None
        if _JOINED is self:
            _JOINED = None

    def exit(self, code: int) -> None:
        """Leave the process with `code`. A non-zero code waits for the other ranks to get here
        too (they failed with this one, or all failed alike) and then ends the process at once,
        so that torchrun sees every rank's own code instead of stopping the late ones."""
        if code == 0 or self.backend is None:
            self.close()
            sys.exit(code)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):  # a rank that is not coming: torchrun ends us
            torch.distributed.all_reduce(torch.zeros(1), group=self._cpu_group)
        os._exit(code)

    # --- internals -------------------------------------------------------------------------
    def _exchange(self, error: BaseException | None) -> _Report | None:
        """Tell every rank whether this one failed; the first failing rank's report, if any."""
        if not self.distributed:
            return None
        assert self._meeting, "a meeting point after the ranks stopped meeting"
        flag = torch.tensor([0 if error is None else 1])
        self._collective(torch.distributed.all_reduce, flag, op=torch.distributed.ReduceOp.MAX,
                         group=self._cpu_group)
        if int(flag.item()) == 0:
            return None
        self._meeting, self._failed = False, True  # every rank saw it: no collective after this
        mine = None if error is None else _Report(self.rank, _describe(error), _is_user(error))
        reports: list[_Report | None] = [None] * self.world_size
        torch.distributed.all_gather_object(reports, mine, group=self._cpu_group)
        return next(r for r in reports if r is not None)

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except BaseException:
            self._meeting, self._failed = False, True  # a broken group (a rank died, a timeout)
            raise


LOCAL = World()  # the world of one; its collectives are no-ops, so it can be shared
# the World whose process group this process joined (torch's process group is process-wide too)
_JOINED: World | None = None


def init(device_kind: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
         environ: Mapping[str, str] = os.environ) -> World:
    """This process's World, joining the process group when launched by torchrun with several
    processes: gloo for `device_kind` "cpu", NCCL for "cuda" (this rank's GPU becomes the current
    device). A collective that waits longer than `timeout_s` for the other ranks fails."""
    global _JOINED
    if _JOINED is not None:
        return _JOINED
    world = World.from_env(environ)
    if not world.distributed:
        return world
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        if world.local_rank >= torch.cuda.device_count():
            fail(f"rank {world.rank} has LOCAL_RANK {world.local_rank} but this node has "
                 f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node "
                 "(--nproc-per-node) or use --device cpu")
        torch.cuda.set_device(world.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend, rank=world.rank, world_size=world.world_size,
            timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":  # every rank creates it, in the same order, as torch requires
        world._cpu_group = torch.distributed.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    world.backend = backend
    _JOINED = world
    return world


def balance(costs: Sequence[float], n_ranks: int) -> list[int]:
    """The rank of each item: greedy longest-processing-time assignment (items by decreasing cost,
    each to the rank with the least total so far; ties to the earlier item and the lower rank), so
    the result is deterministic and the largest total is at most 4/3 of the optimum (Graham 1969).
    """
    assert n_ranks >= 1, n_ranks
    load = [0.0] * n_ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n_ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


@contextlib.contextmanager
def exit_together() -> Iterator[None]:
    """The outermost frame of a CLI's main(). In a process that joined a process group (`init`),
    the rank ends through `World.exit` with its exit code (see the module docstring), another
    rank's internal error (RankFailed that is not a user error) being one `error:` line and exit
    1 here; without one, everything passes through unchanged."""
    try:
        yield
    except BaseException as e:
        world = _JOINED
        if world is None:
            raise
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        elif isinstance(e, RankFailed):
            error_line(str(e))
            code = EXIT_RANK_FAILED
        else:  # this rank's own internal error: its traceback, as Python would print it
            traceback.print_exc()
            code = 1
        world.exit(code)
    else:
        if _JOINED is not None:
            _JOINED.close()


def _rank_failed(report: _Report, world: World) -> RankFailed:
    if report.user:
        return RankUserError(f"rank {report.rank} of {world.world_size} failed: {report.message} "
                             f"(rank {world.rank} stopped with it)")
    return RankFailed(f"rank {report.rank} of {world.world_size} failed with an internal error "
                      f"({report.message}; its traceback is in that rank's output); rank "
                      f"{world.rank} stopped with it")


def _is_user(e: BaseException) -> bool:
    if isinstance(e, UserError | KeyboardInterrupt):
        return True
    if isinstance(e, SystemExit):  # a command that exits with shared.errors' usage code
        return e.code == EXIT_USAGE
    return isinstance(e, OSError) and e.errno in _USER_ERRNOS


def _describe(e: BaseException) -> str:
    if isinstance(e, UserError):
        return first_line(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, SystemExit):
        return f"it exited with code {e.code}"
    return f"{type(e).__name__}: {first_line(e)}"


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        fail(f"{name}={value!r} is not a whole number; start the command with torchrun")
