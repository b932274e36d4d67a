"""Fully sharded data parallel training (FSDP2) for FlamingoPaLM and Flamingo over a transformers LM.

``shard_flamingo(model)`` calls PyTorch's ``fully_shard`` on one unit per decoder layer, per gated
block (FlamingoPaLM), for the Perceiver Resampler and the frozen vision encoder, and last on the
whole model (the root unit). Each rank then holds 1/world of every parameter; a unit's parameters
are all-gathered just before its forward (and again in backward) and freed after.

The frozen language model is sharded like the rest and simply has no gradients: FSDP2 all-gathers
a parameter with ``requires_grad=False`` but never reduce-scatters a gradient for it, so nothing
has to be unfrozen and the optimizer, built over ``model.flamingo_parameters()``, holds state only
for the trained shards. Freeze before sharding: FSDP2 reads ``requires_grad`` when it first
all-gathers a parameter.

What lands in which unit:
    - each PaLM layer / each of the LM's decoder layers (a ``FusionLayer`` holds its LM layer);
    - each FlamingoPaLM gated block (FlamingoPaLM calls it as a module);
    - for Flamingo over a transformers LM, each gated block's attention and its feed-forward. The
      blocks are not children of their ``FusionLayer``: it projects the media keys and values once
      per call (``attn.project_media``) and reads them with ``attn.attend``, methods that FSDP2's
      hooks would not see, so both are registered with ``register_fsdp_forward_method``;
    - the Perceiver Resampler; the vision encoder;
    - the root: token embedding, final norm and output projection (so a tied embedding/output
      pair is one parameter of one unit and stays tied), ``token_rows``, and the two scalar gates
      of each transformers-LM gated block.

Mixed precision (``MixedPrecisionPolicy``): the sharded parameters, the optimizer state and the
gradient reduction stay float32; each unit computes in ``param_dtype`` (bfloat16 by default). Over
a language model loaded in bfloat16 or float16, its units keep that dtype and what Flamingo trains
stays float32 (its master weights); with ``param_dtype=None`` the trained units compute in the
language model's dtype under ``torch.autocast`` (see ``Flamingo``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from flamingo_pytorch.flamingo import Flamingo
from flamingo_pytorch.flamingo_palm import FlamingoPaLM
from flamingo_pytorch.language_model import find_decoder_layers


def default_mesh(device: torch.device | str) -> DeviceMesh:
    """A one-dimensional mesh over all ranks of the default process group, on ``device``'s type
    (for a model still on the meta device: cuda when there is one, else cpu)."""
    if not dist.is_initialized():
        raise RuntimeError("shard_flamingo needs torch.distributed initialised (run under torchrun)")
    device_type = torch.device(device).type
    if device_type == "meta":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units of their own, innermost first (the root comes after).

    Raises:
        TypeError: ``model`` is neither a ``FlamingoPaLM`` nor a ``Flamingo``.
    """
    if isinstance(model, FlamingoPaLM):
        units = [*model.palm.layers, *model.gated_cross_attn, model.perceiver_resampler]
        encoder = model.img_encoder
    elif isinstance(model, Flamingo):
        blocks = [unit for block in model.gated_cross_attn for unit in (block.attn, block.ff)]
        units = [*find_decoder_layers(model.lm), *blocks, model.perceiver_resampler]
        encoder = model.vision_encoder
    else:
        raise TypeError(f"model must be a FlamingoPaLM or a Flamingo, got {type(model).__name__}")
    if encoder is not None and any(True for _ in encoder.parameters()):
        units.append(encoder)
    return units


def shard_flamingo(
    model: FlamingoPaLM | Flamingo,
    *,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    checkpoint_activations: bool = False,
    reshard_after_forward: bool = True,
) -> FlamingoPaLM | Flamingo:
    """Shard ``model`` in place with FSDP2 for Flamingo training; -> the same model.

    The model is on its device with the same weights on every rank (same seed or checkpoint), or
    on the meta device: then call ``model.to_empty(device=...)`` after this and load or initialise
    the weights, so that no rank ever holds the whole model. The language model and the encoder
    are frozen here before sharding.

    Args:
        model: a ``FlamingoPaLM`` or a ``Flamingo`` over a transformers language model.
        mesh: the device mesh to shard over; default: all ranks, on the model's device type.
        param_dtype: the dtype each unit computes in (None: the parameters' own, e.g. float32).
        reduce_dtype: the dtype gradients are reduce-scattered in.
        checkpoint_activations: recompute each decoder layer's activations in backward
            (FlamingoPaLM: also each gated block's; a transformers LM: its gradient checkpointing).
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3);
            False keeps them until backward (ZeRO-2 like: more memory, fewer all-gathers).
    """
    units = sharding_units(model)  # validates the type
    if mesh is None:
        mesh = default_mesh(next(model.parameters()).device)
    freeze_language_model(model)
    set_activation_checkpointing(model, checkpoint_activations)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if isinstance(model, Flamingo):  # the fusion layers call these methods of the blocks' attention, not forward
        for block in model.gated_cross_attn:
            register_fsdp_forward_method(block.attn, "project_media")
            register_fsdp_forward_method(block.attn, "attend")
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # root: backward needs it at once
    return model


def freeze_language_model(model: FlamingoPaLM | Flamingo) -> None:
    """Leave exactly ``flamingo_parameters()`` trainable (FlamingoPaLM: enter flamingo mode)."""
    if isinstance(model, FlamingoPaLM):
        model.set_flamingo_mode(True)  # a forward with media then changes nothing
    trained = {id(p) for p in model.flamingo_parameters()}
    frozen_trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in trained]
    if frozen_trainable:
        raise ValueError(f"parameters outside flamingo_parameters() require grad: {frozen_trainable[:5]}")


def set_activation_checkpointing(model: FlamingoPaLM | Flamingo, enabled: bool) -> None:
    """Recompute each decoder layer in backward (the models' own per-layer checkpointing)."""
    if isinstance(model, FlamingoPaLM):
        model.palm.checkpoint_activations = enabled
    elif enabled:  # False leaves the language model's own setting as it is
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
