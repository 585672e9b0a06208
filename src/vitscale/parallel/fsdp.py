"""FSDP2 (`fully_shard`): each block's parameters are one all-gather unit, then the root holds
what is left (embeddings, final norm, head). Parameters become DTensors sharded on dim 0 over
the data-parallel mesh (HSDP on a 2-D (dp_replicate, dp_shard) mesh: replicated across the
first dim, sharded across the second); gradients are reduce-scattered (averaged) in backward."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], mesh, param_dtype: str = "float32",
               reduce_dtype: str = "float32", tensor_parallel: bool = False) -> None:
    """Shard `model` in place. param_dtype: the dtype parameters are gathered in for forward and
    backward (the fp32 shards stay the master weights); reduce_dtype: the dtype of the gradient
    reduction. `tensor_parallel`: the model went through `tp.apply_tp` (2-D FSDP x TP), whose
    fused qkv / kv weights FSDP must shard on dim 1 (see tp.fsdp_shard_placement)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from vitscale.parallel import tp

    policy = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    options = dict(mesh=mesh, mp_policy=policy)
    if tensor_parallel:
        options["shard_placement_fn"] = tp.fsdp_shard_placement
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    if tensor_parallel:
        tp.check_fsdp_layout(model)
    # FSDP2 warns when the root returns a view (the class token / pooled slice): an in-place op
    # on it would skip a hook. The trainer and evaluators never write into the logits.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    _register_feature_methods(model, ("forward_features", "forward_pooled"))


def _register_feature_methods(model: nn.Module, names: tuple[str, ...]) -> None:
    """Evaluators call `forward_pooled` / `forward_features` instead of forward: called from
    outside, they gather the root's parameters as forward does (FSDP's forward-method hooks).
    Called from within forward or from one another they must not, or the nested hooks would
    free the root's parameters mid-forward; a depth count tells the two apart."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    depth = [0]

    def enter(*_args):
        depth[0] += 1

    def leave(*_args):
        depth[0] -= 1

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    for name in names:
        if not hasattr(model, name):
            continue
        plain = getattr(model, name)
        register_fsdp_forward_method(model, name)
        hooked = getattr(model, name)

        def call(*args, _plain=plain, _hooked=hooked, **kwargs):
            if depth[0]:
                return _plain(*args, **kwargs)
            enter()
            try:
                return _hooked(*args, **kwargs)
            finally:
                leave()

        setattr(model, name, call)


def reshard(model: nn.Module) -> None:
    """Free gathered parameters after a forward pass without backward (evaluation): FSDP2 keeps
    the root's parameters gathered after forward for the backward pass that would follow, and
    the optimizer, the EMA and checkpoints need them as shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
