"""Where the consumer is in an epoch, saved and restored: ``state_dict()`` and
``load_state_dict()`` of shard mode and ParallelMap (docs/checkpoint.md).

The position of a consumer is small: the epoch, and the indices of that epoch's items it
has received. Items of a pass are addressed by index (shard mode: the j-th item of worker
``w``'s shard is ``w + j * num_workers``; a map: the position of the input in the pass of
its source), so a new runner resumes by skipping the indices already received:

- shard mode: each worker gets a :class:`Plan` (its dataflow travels wrapped in
  :class:`Resumed`, so it reaches the worker on every transport, a Ray actor's included):
  before its first pass it loads its dataflow's state, and in that pass it sends no item
  the consumer already had. Before every pass a worker sends a :class:`PassStart` with its
  dataflow's ``state_dict()`` (None without one): the consumer keeps those of the epochs it
  may still be asked about.
- ParallelMap: all in the consumer; the source's state is taken before each pass.

The consumer tracks what it received with as little as possible on the hot path: in order,
the next index (everything below it is received); unordered, a set of indices.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, StateError

#: the version of the state's layout; a state of another version is refused.
VERSION = 1


@dataclass(frozen=True)
class PassStart:
    """Sent by a shard-mode worker before its items of ``epoch``: its dataflow's state."""

    worker_id: int
    epoch: int
    #: ``state_dict()`` of what the worker iterates (its shard, or the dataflow), or None.
    state: Any


class Done:
    """A set of indices: all below ``below``, and those in ``rest``."""

    __slots__ = ("below", "rest")

    def __init__(self, below: int = 0, rest: frozenset[int] | set[int] = frozenset()):
        rest = set(rest)
        while below in rest:
            rest.discard(below)
            below += 1
        self.below = below
        self.rest = frozenset(i for i in rest if i > below)

    def __contains__(self, index: int) -> bool:
        return index < self.below or index in self.rest

    def __len__(self) -> int:
        return self.below + len(self.rest)

    def union(self, below: int, extra: set[int] | frozenset[int] = frozenset()) -> Done:
        return Done(max(below, self.below), self.rest | set(extra))

    def to_json(self) -> dict[str, Any]:
        """``{"below": n}``, plus ``"bits"``: the rest as a zlib-compressed bitmap in base64."""
        out: dict[str, Any] = {"below": self.below}
        if self.rest:
            bits = bytearray((max(self.rest) - self.below) // 8 + 1)
            for i in self.rest:
                j = i - self.below
                bits[j >> 3] |= 1 << (j & 7)
            out["bits"] = base64.b64encode(zlib.compress(bytes(bits), 9)).decode("ascii")
        return out

    @classmethod
    def from_json(cls, data: Any) -> Done:
        if not isinstance(data, dict) or not isinstance(data.get("below"), int):
            raise ValueError(f"not a set of received indices: {data!r}")
        below = data["below"]
        rest = set()
        if "bits" in data:
            bits = zlib.decompress(base64.b64decode(data["bits"]))
            for j, byte in enumerate(bits):
                for b in range(8):
                    if byte >> b & 1:
                        rest.add(below + 8 * j + b)
        return cls(below, rest)

    def __repr__(self) -> str:
        return f"Done(below={self.below}, rest={sorted(self.rest)})"


@dataclass(frozen=True)
class Plan:
    """What a resumed worker needs for its first pass."""

    #: indices of the first pass the consumer already received: not sent again.
    skip: Done
    #: the dataflow state per worker of the saved run, or None (nothing to load).
    states: list[Any] | None
    #: the absolute number of the runner's epoch 0: a pass is seeded by the run's seed
    #: and its absolute epoch (flowplug._passcheck), so a resumed run repeats the saved one.
    base: int = 0

    def state_for(self, worker: int) -> Any:
        assert self.states is not None
        # Per worker when the counts match; otherwise every worker's state is the same
        # (checked by load_state_dict()).
        return self.states[worker] if worker < len(self.states) else self.states[0]


class Resumed:
    """A worker's dataflow with its :class:`Plan`; the shard gate unwraps it."""

    def __init__(self, inner: Any, plan: Plan):
        self.inner = inner
        self.plan = plan

    def reset_state(self) -> None:
        self.inner.reset_state()

    def __repr__(self) -> str:
        return repr(self.inner)


def load_into(target: Any, state: Any) -> None:
    """Give ``target`` (a dataflow, or a worker's shard of one) its saved state."""
    load = getattr(target, "load_state_dict", None)
    if not callable(load):
        raise TypeError(
            f"the saved state holds a dataflow state, but {type(target).__name__} has no "
            "load_state_dict(); resume with the dataflow the state was saved from"
        )
    load(state)


def take_state(target: Any) -> Any:
    """``target.state_dict()``, or None when it has none."""
    get = getattr(target, "state_dict", None)
    return get() if callable(get) else None


class Progress:
    """The consumer's side: which epoch, what it received, what a resumed run skips.

    The runner's own epochs count from 0; ``base`` is the epoch number of the runner's
    epoch 0 (non-zero after a resume).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.base = 0
        #: what the saved run had received of the runner's epoch 0, or None.
        self.skip: Done | None = None
        #: dataflow state(s) to load before epoch 0: per worker (shard), the source's (map).
        self.states: Any = None
        #: the run's seed from the loaded state (shard mode), or None.
        self.seed: int | None = None
        self.loaded = False
        #: ordered: every index below it is received.
        self.nxt = 0
        #: unordered: the received indices.
        self.got: set[int] = set()
        #: per epoch of the runner: worker -> its PassStart state (shard); 0 -> source (map).
        self.passes: dict[int, dict[int, Any]] = {}

    def begin(self, k: int) -> Done | None:
        """The runner starts its epoch ``k``; return what to skip in it (epoch 0 of a resume)."""
        self.nxt = 0
        self.got = set()
        for old in [e for e in self.passes if e < k]:
            del self.passes[old]
        return self.skip if k == 0 else None

    def passed(self, msg: PassStart) -> None:
        self.passes.setdefault(msg.epoch, {})[msg.worker_id] = msg.state

    def received(self, k: int, ordered: bool) -> Done:
        skip = self.skip if k == 0 and self.skip is not None else Done()
        if ordered:
            return skip.union(self.nxt)
        return skip.union(0, self.got)

    def plan(self) -> Plan | None:
        if self.skip is None and self.states is None and self.base == 0:
            return None
        return Plan(self.skip or Done(), self.states, self.base)

    # ---------------------------------------------------------------- the dict

    def to_dict(
        self,
        k: int,
        received: Done,
        num_workers: int,
        dataflow: Any,
        seed: int | None = None,
    ) -> dict[str, Any]:
        out = {
            "flowplug": VERSION,
            "kind": self.kind,
            "epoch": self.base + k,
            "received": received.to_json(),
            "num_workers": num_workers,
            "dataflow": dataflow,
        }
        if seed is not None:  # shard mode: the seed of the passes (see Plan.base)
            out["seed"] = seed
        return out

    def load(self, state: Any, num_workers: int) -> None:
        if not isinstance(state, dict) or "flowplug" not in state:
            raise ValueError(
                "load_state_dict() needs a dict made by state_dict() of a Runner in shard "
                f"mode or of a ParallelMap, got {type(state).__name__}"
            )
        if state["flowplug"] != VERSION:
            raise ValueError(
                f"this state has layout version {state['flowplug']!r}, this flowplug reads "
                f"version {VERSION}; resume with the flowplug version that saved it"
            )
        if state.get("kind") != self.kind:
            what = {"shard": "a Runner in shard mode", "map": "a ParallelMap"}
            raise ConfigError(
                f"this state was saved by {what.get(str(state.get('kind')), state.get('kind'))}, "
                f"and cannot resume {what[self.kind]}; build the runner the same way it was built"
            )
        skip = Done.from_json(state["received"])
        states = state.get("dataflow")
        if self.kind == "shard" and states is not None:
            saved = state["num_workers"]
            if saved != num_workers and any(s != states[0] for s in states):
                raise ConfigError(
                    f"the state was saved with num_workers={saved}, and each worker's "
                    f"dataflow (its shard) has a state of its own, which does not carry "
                    f"over to num_workers={num_workers}; resume with num_workers={saved}"
                )
        self.base = int(state["epoch"])
        seed = state.get("seed")
        self.seed = int(seed) if seed is not None else None
        self.skip = skip if len(skip) else None
        self.states = states
        self.loaded = True


def refuse_replicate() -> StateError:
    return StateError(
        "state_dict() and load_state_dict() need mode='shard' (or a ParallelMap): in "
        "replicate mode every worker repeats the whole dataflow, so there is no single "
        "position to save; build the runner with mode='shard' to checkpoint it"
    )


def refuse_started(what: str) -> StateError:
    return StateError(
        f"load_state_dict() must be called on a new {what}, before it starts: before "
        "`with`, iteration or reset_state(); build a new one and load the state into it"
    )
