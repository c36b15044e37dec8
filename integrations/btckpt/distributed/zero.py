"""DeepSpeed ZeRO (stages 1-3): every rank saves its own partition, in the FSDP2 sharded format.

ZeRO keeps, per rank, flat 1-D partitions: the fp32 master weights and the optimizer moments of a slice of
the flattened parameters (stage 1/2: one flat buffer per param group, split into equal partitions, a
parameter may straddle two ranks; stage 3: every parameter split on its own, ``param.ds_tensor`` holds this
rank's piece of the model weights too). The live engine says which piece of which parameter a rank holds
(stage 1/2: ``param._hp_mapping``, the map DeepSpeed's universal checkpoint uses; stage 3: the optimizer's
``grad_position`` and the parameter's partition rank), as a *fragment*: elements ``[start, start + numel)``
of the flattened parameter. No gather, no pickle: each fragment becomes up to ``2 * ndim - 1`` row-major
boxes (contiguous views of the partition) recorded as chunks of the parameter's real shape, so a saved
ZeRO checkpoint is an ordinary btckpt sharded checkpoint (``meta["btckpt.sharded"]``, chunks that tile
each shape, checked at commit and on read). Groups:

- ``model``: the model weights in their own dtype and with their own keys (stage 1/2: the replicated
  parameters' fragment each rank owns; stage 3: ``ds_tensor``), buffers from rank 0: consolidation gives a
  servable folder, and a plain model (any world size, FSDP2) restores from it through DCP's planner;
- ``optimizer``: ``get_optimizer_state_dict``'s FQN form (``state.<fqn>.exp_avg`` ..., ``step`` as a
  tensor, ``param_groups`` with FQN ``params``): a plain ``torch.optim`` optimizer loads it too;
- ``master_weights``: the fp32 master weights (FQN keys; the same values as ``model`` when training in fp32);
- ``deepspeed``: plain data (stage, the engine's step counters, the loss scaler).

Restore into a live ZeRO engine (:func:`load_zero`, any stage and world size: the live engine's fragments
are filled from the saved full tensors, one parameter at a time). Never imports deepspeed: the engine's
objects are read through their attributes (checked: :func:`zero_optimizer` refuses what it does not know).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, CorruptCheckpoint, StateMismatch, UnsupportedValue
from ..format.layout import DTYPE_TO_ST, FlatGroup
from .shards import ShardedPart, assemble, rank_group, sharded_entry
from .world import World

__all__ = ["ZERO_META", "ZeroState", "Fragment", "zero_optimizer", "zero_stage", "fragments", "boxes",
           "ZeroPart", "prepare_zero", "load_zero"]

ZERO_META = "btckpt.zero"
MODEL, OPTIMIZER, MASTER, PLAIN = "model", "optimizer", "master_weights", "deepspeed"


def zero_optimizer(opt: Any) -> Any:
    """The ZeRO optimizer inside ``opt`` (accelerate's wrapper, the engine's ``optimizer``), or None."""
    seen = 0
    while opt is not None and seen < 4:
        if hasattr(opt, "single_partition_of_fp32_groups") or hasattr(opt, "fp32_partitioned_groups_flat"):
            return opt
        opt = getattr(opt, "optimizer", None)
        seen += 1
    return None


def zero_stage(zo: Any) -> int:
    """1, 2 or 3."""
    if hasattr(zo, "fp32_partitioned_groups_flat"):
        return 3
    return 2 if getattr(zo, "partition_gradients", False) else 1


def _refuse_offload(zo: Any) -> None:
    if getattr(zo, "params_in_nvme_and_cpu", False) or getattr(zo, "optimizer_swapper", None) is not None or \
            getattr(zo, "swap_optimizer", False):
        raise ConfigError("btckpt does not save DeepSpeed ZeRO-Infinity NVMe offload (zero_optimization."
                          "offload_optimizer/offload_param device 'nvme'): the partitions live in swap files. "
                          "Use device 'cpu' or 'none', or remove btckpt's callback/plugin to use DeepSpeed's own "
                          "save_checkpoint")


@dataclass
class Fragment:
    """This rank's piece of one parameter: elements ``[start, start + numel)`` of the flattened parameter.
    ``lp``: the piece of the model weights (model dtype) when this rank holds it apart from the full parameter
    (stage 3), ``hp``: of the fp32 master, ``state``: of each optimizer moment (same numel)."""

    fqn: str
    shape: list[int]
    start: int
    numel: int
    group: int
    hp: torch.Tensor
    lp: torch.Tensor | None
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def _moments(base: Any, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    st = base.state.get(flat, {})
    return {k: v for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == flat.numel()}


def fragments(zo: Any, module: torch.nn.Module) -> list[Fragment]:
    """This rank's fragments of ``module``'s trainable parameters under ZeRO optimizer ``zo``."""
    _refuse_offload(zo)
    base = zo.optimizer
    out: list[Fragment] = []
    stage = zero_stage(zo)
    for fqn, param in module.named_parameters():
        if not param.requires_grad:
            continue
        p: Any = param  # DeepSpeed's attributes (ds_tensor, _hp_mapping) are not on torch's type
        if stage == 3:
            gi, off, pn = zo.grad_position[zo.get_param_id(p)]
            rank = int(zo._get_param_partition_rank(p))
            total = int(p.ds_numel)
            start = rank * int(pn)
            numel = max(0, min(int(pn), total - start))
            if numel == 0:
                continue
            flat = zo.fp32_partitioned_groups_flat[gi]
            hp = flat.narrow(0, off, numel)
            lp = p.ds_tensor.data.view(-1).narrow(0, 0, numel)
            moments = {k: v.narrow(0, off, numel) for k, v in _moments(base, flat).items()}
            out.append(Fragment(fqn, list(p.ds_shape), start, numel, int(gi), hp, lp, moments))
        else:
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                continue
            gi = int(m.param_group_index)
            flat = zo.single_partition_of_fp32_groups[gi]
            a, la = m.hp_fragment_address, m.lp_fragment_address
            moments = {k: v.narrow(0, a.start, a.numel) for k, v in _moments(base, flat).items()}
            out.append(Fragment(fqn, list(p.shape), int(la.start), int(a.numel), gi, m.hp_fragment, None, moments))
    return out


def boxes(shape: list[int], start: int, numel: int) -> Iterator[tuple[list[int], list[int], int]]:
    """The row-major range ``[start, start + numel)`` of a tensor of ``shape`` as boxes: (offsets, sizes, offset
    of the box's first element in the range). Each box is contiguous in row-major order."""
    if not shape:
        if numel:
            yield [], [], 0
        return
    n = len(shape)
    strides = [math.prod(shape[i + 1:]) for i in range(n)]
    pos, end = start, start + numel
    while pos < end:
        idx = [(pos // strides[i]) % shape[i] for i in range(n)]
        for d in range(n):  # the largest block that starts here and fits
            if pos % strides[d] == 0 and end - pos >= strides[d]:
                count = min((end - pos) // strides[d], shape[d] - idx[d])
                yield idx, [1] * d + [count] + list(shape[d + 1:]), pos - start
                pos += count * strides[d]
                break


def _st_dtype(fqn: str, t: torch.Tensor) -> str:
    if t.dtype not in DTYPE_TO_ST:
        raise UnsupportedValue(f"tensor {fqn!r} has dtype {t.dtype}, which safetensors cannot store")
    return DTYPE_TO_ST[t.dtype]


class _Builder:
    """One sharded group of one rank: leaves (logical key -> parts record), tensors (file key -> tensor)."""

    def __init__(self, group: str, w: World) -> None:
        self.group, self.w = group, w
        self.tensors: dict[str, torch.Tensor] = {}
        self.refs: list[dict[str, Any]] = []

    def leaf(self, key: str, shape: list[int], dtype: str, pieces: list[tuple[list[int], list[int],
                                                                            torch.Tensor]]) -> dict[str, Any]:
        chunks = []
        for offsets, sizes, t in pieces:
            ck = f"{key}@{','.join(map(str, offsets))}" if shape else key
            self.tensors[ck] = t.detach()
            ref = {"key": ck, "offsets": offsets, "sizes": sizes, "node": self.w.node_rank}
            self.refs.append(ref)  # fill_refs adds "file"
            chunks.append(ref)
        return {"__tensor__": {"parts": {"key": key, "shape": shape, "dtype": dtype, "chunks": chunks}}}

    def fragment(self, key: str, shape: list[int], flat: torch.Tensor, start: int) -> dict[str, Any]:
        pieces = [(o, s, flat.narrow(0, at, math.prod(s)).view(s)) for o, s, at in boxes(shape, start, flat.numel())]
        return self.leaf(key, shape, _st_dtype(key, flat), pieces)

    def whole(self, key: str, t: torch.Tensor, *, owned: bool) -> dict[str, Any]:
        pieces = [([0] * t.dim(), list(t.shape), t)] if owned else []
        return self.leaf(key, list(t.shape), _st_dtype(key, t), pieces)


@dataclass
class ZeroState:
    """The ZeRO engine's state to save: what a framework adapter hands :func:`prepare_zero` (the module whose
    parameter names are the keys, and the ZeRO optimizer)."""

    module: torch.nn.Module
    optimizer: Any
    counters: dict[str, Any] = field(default_factory=dict)  # the engine's global_steps & co. (plain data)

    def state_dict(self) -> dict[str, Any]:  # never saved as a group itself: see prepare_zero
        raise ConfigError("ZeroState is saved through btckpt's ZeRO path (Checkpointer.save), not state_dict()")


class ZeroPart(ShardedPart):
    """:class:`ShardedPart` whose leaves carry several chunks per rank (ZeRO fragments as boxes); ``sources``:
    the state entries it was built from (the :class:`ZeroState`), saved through it only."""

    sources: tuple[str, ...] = ()

    @staticmethod
    def merge_leaf(trees: list[Any], *, path: str) -> Any:
        """A ZeRO leaf: several chunks per rank (its fragments), all of them tiling the full shape."""
        ref = trees[0]["__tensor__"]
        if not (isinstance(ref, dict) and "parts" in ref):
            return None
        chunks = [{k: c[k] for k in ("offsets", "sizes", "file", "key", "node")}
                  for t in trees for c in t["__tensor__"]["parts"]["chunks"]]
        return sharded_entry(trees[0]["__tensor__"]["parts"], chunks, path=path, what="ZeRO partitions")


def _scaler(zo: Any) -> dict[str, Any]:
    ls = getattr(zo, "loss_scaler", None)
    out: dict[str, Any] = {}
    for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
        v = getattr(ls, k, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def prepare_zero(zs: ZeroState, w: World, *, source: str = "zero") -> ZeroPart:
    """Flatten this rank's ZeRO partitions of ``zs`` into the groups ``model``, ``optimizer`` and
    ``master_weights`` (each rank its own ``<group>-rank<R>`` file), plus the plain ``deepspeed`` data."""
    zo = zs.optimizer
    stage = zero_stage(zo)
    frags = fragments(zo, zs.module)
    base = zo.optimizer
    model, master, optim = _Builder(MODEL, w), _Builder(MASTER, w), _Builder(OPTIMIZER, w)
    model_tree: dict[str, Any] = {}
    master_tree: dict[str, Any] = {}
    by_fqn = {f.fqn: f for f in frags}
    state_tree: dict[str, Any] = {}
    groups_fqns: list[list[str]] = [[] for _ in base.param_groups]
    to_group = getattr(zo, "sub_group_to_group_id", None) if stage == 3 else None
    trainable = {fqn: p for fqn, p in zs.module.named_parameters() if p.requires_grad}
    gi_of = _groups_of(zo, trainable)
    for fqn, param in zs.module.named_parameters():
        if fqn not in trainable:
            continue
        p: Any = param
        shape = list(p.ds_shape) if stage == 3 else list(p.shape)
        f = by_fqn.get(fqn)
        gi = gi_of[fqn]
        groups_fqns[int(to_group[gi]) if to_group is not None else gi].append(fqn)
        flat = zo.fp32_partitioned_groups_flat[gi] if stage == 3 else zo.single_partition_of_fp32_groups[gi]
        st = base.state.get(flat, {})
        if f is None:  # this rank holds none of it: empty leaves, the merge takes the other ranks' chunks
            model_tree[fqn] = model.leaf(fqn, shape, _st_dtype(fqn, p), [])
            master_tree[fqn] = master.leaf(fqn, shape, _st_dtype(fqn, flat), [])
            moments = {k: optim.leaf(f"state.{fqn}.{k}", shape, _st_dtype(fqn, v), [])
                       for k, v in _moments(base, flat).items()}
        else:
            lp = f.lp if f.lp is not None else p.data.view(-1).narrow(0, f.start, f.numel)
            model_tree[fqn] = model.fragment(fqn, shape, lp, f.start)
            master_tree[fqn] = master.fragment(fqn, shape, f.hp, f.start)
            moments = {k: optim.fragment(f"state.{fqn}.{k}", shape, v, f.start) for k, v in f.state.items()}
        step = st.get("step", base.param_groups[gi].get("step", 0))
        step_t = torch.tensor(float(step.item() if isinstance(step, torch.Tensor) else step), dtype=torch.float32)
        moments["step"] = optim.whole(f"state.{fqn}.step", step_t, owned=w.rank == 0)
        state_tree[fqn] = moments
    frozen = [n for n, p in zs.module.named_parameters() if not p.requires_grad]
    if frozen:
        raise ConfigError(f"btckpt's ZeRO save does not handle frozen parameters yet ({frozen[0]!r} ...): train "
                          "every parameter, or remove btckpt's callback/plugin to use DeepSpeed's own checkpoints")
    for name, b in zs.module.named_buffers():
        if b is not None and name.rsplit(".", 1)[-1] not in _non_persistent(zs.module, name):
            model_tree[name] = model.whole(name, b.detach().clone(), owned=w.rank == 0)
    pgroups = []
    for gi, g in enumerate(base.param_groups):
        d = {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, list, tuple))}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        pgroups.append(dict(d, params=groups_fqns[gi]))
    optim_tree = {"state": state_tree, "param_groups": pgroups}
    trees = {MODEL: model_tree, OPTIMIZER: optim_tree, MASTER: master_tree}
    flat_groups = [FlatGroup(rank_group(b.group, w.rank), trees[b.group], b.tensors, b.refs)
                   for b in (model, optim, master)]
    keys = {(g.name, k) for g in flat_groups for k in g.tensors}
    part = ZeroPart(w.rank, w.node_rank, {MODEL: "model", OPTIMIZER: "optimizer", MASTER: "model"},
                    flat_groups, trees, keys)
    part.sources = (source,)
    return part


def _groups_of(zo: Any, trainable: Mapping[str, torch.nn.Parameter]) -> dict[str, int]:
    """fqn -> the index of the ZeRO param group (and flat partition) holding it."""
    if zero_stage(zo) == 3:
        return {fqn: int(zo.grad_position[zo.get_param_id(p)][0]) for fqn, p in trainable.items()}
    out: dict[str, int] = {}
    for gi, ps in enumerate(zo.bit16_groups):
        ids = {id(p) for p in ps}
        out.update({fqn: gi for fqn, p in trainable.items() if id(p) in ids})
    return out


def _init_state(zo: Any, module: torch.nn.Module, saved: Mapping[str, Any]) -> None:
    """Create the base optimizer's state of a flat partition that has none yet (ZeRO-3 before its first step), with
    the moments the checkpoint holds, so that they can be filled."""
    base = zo.optimizer
    trainable = {fqn: p for fqn, p in module.named_parameters() if p.requires_grad}
    flats = zo.fp32_partitioned_groups_flat if zero_stage(zo) == 3 else zo.single_partition_of_fp32_groups
    for fqn, gi in _groups_of(zo, trainable).items():
        flat = flats[gi]
        if base.state.get(flat):
            continue
        st = saved.get(fqn)
        keys = [k for k in st if k != "step"] if isinstance(st, Mapping) else []
        step: Any = torch.tensor(0.0) if type(base).__module__.startswith("torch.optim") else 0
        base.state[flat] = {"step": step, **{k: torch.zeros_like(flat) for k in keys}}


def _non_persistent(module: torch.nn.Module, name: str) -> set[str]:
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    return set(getattr(owner, "_non_persistent_buffers_set", set()))


def plain_data(zs: ZeroState) -> dict[str, Any]:
    """The ``deepspeed`` group: stage, partition count, engine counters, loss scaler (JSON)."""
    zo = zs.optimizer
    return {"stage": zero_stage(zo), "partition_count": _partition_count(zo), "counters": dict(zs.counters),
            "loss_scaler": _scaler(zo)}


def _partition_count(zo: Any) -> int:
    pc = getattr(zo, "partition_count", None)
    if isinstance(pc, list) and pc:
        return int(pc[0])
    if isinstance(pc, int):
        return pc
    return int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1


# -- restore -------------------------------------------------------------------------------------------------
def load_zero(zs: ZeroState, manifest_state: Mapping[str, Any],
              tensor: Callable[[Mapping[str, Any], str], torch.Tensor], *, where: str) -> dict[str, Any]:
    """Fill the live ZeRO engine of ``zs`` from a saved checkpoint (any saving stage or world size):
    ``manifest_state`` is the manifest's state tree, ``tensor(ref, where)`` the full tensor of a reference
    (checksummed). Every tensor is read and checked before anything is written into the engine; returns
    the saved ``deepspeed`` plain data."""
    zo = zs.optimizer
    _refuse_offload(zo)
    for g in (MODEL, OPTIMIZER, MASTER):
        if g not in manifest_state:
            raise StateMismatch(f"{where}: group {g!r} is missing; this checkpoint was not saved from a DeepSpeed "
                                "ZeRO run by btckpt (restore it with btckpt.load into a plain model instead)")
    stage = zero_stage(zo)
    ostate = manifest_state[OPTIMIZER].get("state", {})
    _init_state(zo, zs.module, ostate)
    frags = fragments(zo, zs.module)
    model_refs, master_refs = manifest_state[MODEL], manifest_state[MASTER]
    reads: list[tuple[torch.Tensor, torch.Tensor]] = []

    def full(refs: Mapping[str, Any], key: str, shape: list[int]) -> torch.Tensor:
        ref = refs.get(key) if isinstance(refs, Mapping) else None
        if not (isinstance(ref, dict) and "__tensor__" in ref):
            raise StateMismatch(f"{where}: no saved tensor {key!r}; the model does not match the checkpoint")
        t = tensor(ref["__tensor__"], where)
        if list(t.shape) != list(shape):
            raise StateMismatch(f"{where}: {key!r} is {list(t.shape)} in the checkpoint, {shape} in the model")
        return t

    for f in frags:
        st = ostate.get(f.fqn)
        if not isinstance(st, Mapping):
            raise StateMismatch(f"{where}: no optimizer state for {f.fqn!r} in the checkpoint")
        lo, n = f.start, f.numel
        reads.append((f.hp, full(master_refs, f.fqn, f.shape).reshape(-1)[lo:lo + n]))
        if f.lp is not None:
            reads.append((f.lp, full(model_refs, f.fqn, f.shape).reshape(-1)[lo:lo + n]))
        for k, dst in f.state.items():
            reads.append((dst, full(st, k, f.shape).reshape(-1)[lo:lo + n]))
    if stage != 3:  # the full replicated model weights on every rank
        for fqn, p in zs.module.named_parameters():
            reads.append((p.data, full(model_refs, fqn, list(p.shape))))
    base = zo.optimizer
    steps: dict[int, float] = {}
    for f in frags:
        st = ostate[f.fqn]
        if "step" in st:
            steps[f.group] = float(tensor(st["step"]["__tensor__"], where).item())
    for dst, src in reads:
        if dst.numel() != src.numel():
            raise CorruptCheckpoint(f"{where}: a saved piece has {src.numel()} elements, the engine's {dst.numel()}")
    prologue = getattr(zo, "checkpoint_event_prologue", None)
    epilogue = getattr(zo, "checkpoint_event_epilogue", None)
    if stage == 3 and callable(prologue):
        prologue()  # every parameter back to its partition (persistent ones hold a gathered copy): collective
    with torch.no_grad():
        for dst, src in reads:
            dst.detach().copy_(src.view_as(dst).to(dst.dtype))
    if stage == 3 and callable(epilogue):
        epilogue()  # gathers the persistent (small) parameters again from the loaded partitions: collective
    saved_groups = manifest_state[OPTIMIZER].get("param_groups", [])
    for gi, g in enumerate(base.param_groups):
        if gi < len(saved_groups) and isinstance(saved_groups[gi], Mapping):
            for k, v in saved_groups[gi].items():
                if k != "params" and k in g and not isinstance(g[k], torch.Tensor):
                    g[k] = type(g[k])(v) if isinstance(g[k], (int, float)) and not isinstance(g[k], bool) else v
    flats = zo.fp32_partitioned_groups_flat if stage == 3 else zo.single_partition_of_fp32_groups
    for gi, flat in enumerate(flats):  # stage 3: gi is a sub-group, each with its own step count
        if gi in steps and "step" in base.state.get(flat, {}):
            old = base.state[flat]["step"]
            base.state[flat]["step"] = (torch.full_like(old, steps[gi]) if isinstance(old, torch.Tensor)
                                        else type(old)(steps[gi]))
    if stage != 3:  # the bit16 partitions (views of the model) follow the master weights' owner: already loaded
        pass
    data = manifest_state.get(PLAIN, {})
    ls = getattr(zo, "loss_scaler", None)
    for k, v in (data.get("loss_scaler", {}) if isinstance(data, Mapping) else {}).items():
        if ls is not None and hasattr(ls, k):
            setattr(ls, k, v)
    return dict(data) if isinstance(data, Mapping) else {}


def read_tensor(parts: Any, here: int) -> Callable[[Mapping[str, Any], str], torch.Tensor]:
    """``tensor(ref, where)`` for :func:`load_zero` over a :class:`btckpt.restore.reader.NodeParts`-like
    reader (``parts.tensor(node, file, key)``); ``here``: this node's rank, for plain references."""
    def tensor(ref: Mapping[str, Any], where: str) -> torch.Tensor:
        if "sharded" in ref:
            return assemble(ref["sharded"], parts.tensor, where=where)
        return parts.tensor(here, ref["file"], ref["key"])

    return tensor
