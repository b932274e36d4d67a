"""Shared tiny configurations: fixed seeds, sizes small enough for two CPU cores."""

from __future__ import annotations

import pytest
import torch
from einops.layers.torch import Rearrange
from torch import nn

from flamingo_pytorch import FlamingoPaLM, MaskedCrossAttention
from flamingo_pytorch.cross_attention import media_index

TINY = dict(
    num_tokens=64,
    dim=32,
    depth=4,
    dim_head=8,
    heads=4,
    ff_mult=2,
    media_token_id=3,
    cross_attn_every=2,
    perceiver_num_latents=4,
    perceiver_depth=1,
    perceiver_num_time_embeds=4,
    max_video_frames=3,
)
IMAGE_SIZE = 8  # tiny images: (3, 8, 8) -> 4 patches of width 32


def tiny_image_encoder(dim: int = 32) -> nn.Module:
    """A patch embedding: (B, 3, 8, 8) -> (B, 4, dim)."""
    return nn.Sequential(nn.Conv2d(3, dim, kernel_size=4, stride=4), Rearrange("B e h w -> B (h w) e"))


def open_gates(model: nn.Module, value: float = 1.0) -> None:
    """Set every tanh gate to ``value`` so the media actually reach the text."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attn_gate") or name.endswith("ff_gate"):
                param.fill_(value)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model() -> FlamingoPaLM:
    torch.manual_seed(0)
    return FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder()).eval()


def saved_storages(fn) -> dict[int, int]:
    """What autograd keeps for the backward of fn(): each saved storage's data pointer -> its element count."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return storages


def dense_and_segmented(attn: MaskedCrossAttention, x, media, locations, time_mask):
    """The immediate-mode attention (``attend``) and the dense masked reference on the same inputs."""
    k, v = attn.project_media(media)
    index = media_index(locations)
    segmented = attn.attend(x, k, v, index, time_mask)
    dense = attn.to_out(attn.attend_dense(attn.to_q(attn.norm(x)), k, v, index, time_mask))
    return segmented, dense, index


def full_logits(model: FlamingoPaLM, text: torch.Tensor, **media) -> torch.Tensor:
    """Last-position logits of a full pass (forward without its freezing side effect)."""
    with torch.no_grad():
        resampled = model.encode_media(text, **media)
        return model.decode(text, resampled, media.get("time_mask"))[:, -1]


def greedy_by_full_forward(model: FlamingoPaLM, text: torch.Tensor, steps: int = 10, **media) -> torch.Tensor:
    """Greedy decoding by re-running the whole model on the whole sequence for every token (never the media token)."""
    for _ in range(steps):
        logits = full_logits(model, text, **media)
        logits[:, TINY["media_token_id"]] = float("-inf")
        text = torch.cat((text, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return text


def fsdp2_available() -> bool:
    """Whether this torch has the public FSDP2 API (``torch.distributed.fsdp.fully_shard``, torch 2.6+)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available()


def reply_with_logits(model: nn.Module, state, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate_from`` on a conversation ``state`` -> (the reply (b, steps), the logits each of its
    tokens was chosen from (b, steps, v)): a streamer sees each token before it is fed back, while
    ``state.logits`` are still the ones it came from (its first ``put`` is the conversation so far)."""
    chosen_from = []

    class Recorder:
        def put(self, value: torch.Tensor) -> None:
            chosen_from.append(state.logits.clone())

        def end(self) -> None:
            pass

    reply = model.generate_from(state, max_new_tokens=steps, temperature=0, streamer=Recorder())
    return reply, torch.stack(chosen_from[1:], dim=1)
