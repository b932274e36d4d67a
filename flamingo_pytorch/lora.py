"""LoRA adapters on Flamingo's frozen language model, through peft (partial unfreezing, as IDEFICS2 does).

    from peft import LoraConfig
    from flamingo_pytorch.lora import add_lora

    flamingo = Flamingo(lm, media_token_id=...)          # wraps and freezes the LM
    adapters = add_lora(flamingo, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW(p for p in flamingo.parameters() if p.requires_grad)

The adapters are injected in place into ``flamingo.lm`` (``peft.inject_adapter_in_model``), so
``flamingo.lm`` stays the same transformers model, called by Flamingo and by its ``generate`` as
before; the decoder layers that Flamingo wrapped are found through their ``FusionLayer`` (peft
matches ``target_modules`` against the module names, ``model.layers.0.layer.self_attn.q_proj``).
They are added after wrapping because Flamingo freezes the whole language model when it wraps it.
At init LoRA's B matrices are zero, so with the gates closed the logits are still the language
model's, exactly. The adapters are float32 (master weights, like the rest of what trains) over a
bfloat16 or float16 LM; peft casts their input up and their output back. A quantized LM works the
same way (torchao int8 weight-only, bitsandbytes NF4: QLoRA).

Saving: ``flamingo.save_trained(path)`` writes the adapters with the rest of what trains (every
parameter of ``flamingo.lm`` that requires grad), and ``load_trained`` reads them into a fresh
Flamingo with the same adapters added. peft's own ``get_peft_model_state_dict`` is not the way here:
it finds adapters by module path, and the state-dict keys of the fused layers drop ``layer.`` (so
that the LM's checkpoints load), so it silently leaves out the adapters of every fused layer.
"""

from __future__ import annotations

from torch import nn


def peft_package():
    try:
        import peft
    except ModuleNotFoundError as error:
        raise ImportError('LoRA adapters need peft: pip install "flamingo-pytorch[peft]"') from error
    return peft


def add_lora(flamingo: nn.Module, config) -> list[nn.Parameter]:
    """Add peft LoRA adapters to the frozen language model of ``flamingo``, in place.

    Args:
        flamingo: a ``Flamingo`` (its language model ``flamingo.lm`` is frozen when wrapped).
        config: a ``peft.LoraConfig``; ``target_modules`` names the LM's layers to adapt
            (e.g. ``["q_proj", "v_proj"]`` for Llama, Qwen or Mistral).

    Returns:
        The parameters of ``flamingo.lm`` that now train: the adapters (and the biases or
        ``modules_to_save`` that ``config`` asks for), e.g. for their own learning rate.

    Raises:
        TypeError: ``config`` is not a ``LoraConfig``, or ``flamingo`` has no language model ``lm``.
        ValueError: ``flamingo.lm`` already has peft adapters.
    """
    peft = peft_package()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    lm = getattr(flamingo, "lm", None)
    if not isinstance(lm, nn.Module):
        raise TypeError(f"flamingo must be a Flamingo (with a language model .lm), got {type(flamingo).__name__}")
    if getattr(lm, "peft_config", None):
        raise ValueError(f"flamingo.lm already has peft adapters ({', '.join(lm.peft_config)}): add LoRA once")
    from peft.tuners.tuners_utils import cast_adapter_dtype

    peft.inject_adapter_in_model(config, lm)  # the rest of lm stays frozen, as Flamingo left it
    cast_adapter_dtype(lm, "default")  # float32 master weights over a bf16/fp16 LM, as get_peft_model does
    return [param for param in lm.parameters() if param.requires_grad]
