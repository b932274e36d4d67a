"""What the full-size checks share (tests/test_families.py, tests/test_vision_families.py): released configs
cut to two decoder layers, random bfloat16 weights, and the checks each model goes through.

- closed gates (as built): Flamingo's logits are the bare language model's, bit for bit, with images given;
- open gates: the images reach the text (other images change the logits after the first media token,
  never before it, and a padded image changes nothing), cached greedy ``generate`` agrees with a full
  forward over its output (``check_cached_generation``), and so does a two-turn conversation
  (``check_conversation``).
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import open_gates, reply_with_logits
from torch import Tensor, nn

from flamingo_pytorch import Flamingo

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

MEDIA = 7  # an ordinary token id standing for <image>; prompt tokens are drawn from [10, 1000)
slow = pytest.mark.slow


def released(values: dict) -> transformers.PretrainedConfig:
    """A transformers config from a released config.json's values (``model_type`` among them), cut to two
    decoder layers."""
    values = dict(values, num_hidden_layers=2)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def random_lm(values: dict) -> nn.Module:
    """A random bfloat16 causal LM with a released config's ``values`` and two decoder layers.

    Built in bfloat16 from the start (half the memory and time of float32 and a cast), and initialized
    once by transformers' ``init_weights`` (not after torch's default initialization as well, which
    would double the seconds spent drawing the wide embedding).
    """
    from transformers.initialization import no_init_weights

    config = released(values)
    torch.manual_seed(0)
    with no_init_weights():
        lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm.init_weights()
    return lm.eval()


def wrap(lm: nn.Module, **kwargs) -> Flamingo:
    """Flamingo with a gated block before both decoder layers; small resampler and blocks of our own sizes."""
    torch.manual_seed(0)
    sizes = dict(dim_head=64, heads=8, ff_mult=1, perceiver_depth=1, perceiver_num_latents=8)
    return Flamingo(lm, media_token_id=MEDIA, cross_attn_every=1, perceiver_num_time_embeds=2, **sizes, **kwargs).eval()


def prompt() -> Tensor:
    """(2, 10) token ids: <image> at positions 1 and 6 of the first row, at position 1 of the second."""
    text = torch.randint(10, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    text[0, [1, 6]] = MEDIA
    text[1, 1] = MEDIA
    return text


TIME_MASK = torch.tensor([[True, True], [True, False]])  # the second row has one image: its second item is padding
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: one bf16 ulp, relative (a rounding errs by half of it)


def logit_tolerance(logits: Tensor) -> Tensor:
    """How far a cached bf16 step's logits (..., V) may lie from a full forward's: 4 eps max|z| per position.

    The two computations do the same arithmetic in other orders and shapes, so any bf16 rounding on
    the way may land on the other neighbour: about 16 roundings of the hidden states (attention, MLP
    and their residual adds in 2 decoder layers, the same in 2 gated blocks) and the final norm, each
    up to eps/2 relative. Independent, they leave the final hidden state off by about
    sqrt(17) eps/2 = 2 eps relative, so each logit by about 2 eps times the logits' rms, and the
    largest such error over the vocabulary (about 4.5 standard deviations) by about 2 eps max|z|
    (max|z| is about 4.5 rms for random weights). Rounding the logits themselves adds eps/2 max|z|.
    4 eps max|z| covers the 2.5 with room; the worst measured (10 families, 1 and 2 threads) is 1.35.
    """
    return 4 * BF16_EPS * logits.abs().amax(dim=-1, keepdim=True)


def check_images_matter(model: Flamingo, text: Tensor, media: dict, *, above_tolerance: bool) -> None:
    """With the gates open: other images change every logit row from the first <image> on (by more than
    ``logit_tolerance`` if ``above_tolerance``), and no row before it; changing a padded item (time_mask
    False) changes nothing."""
    (name, given), time_mask = next((k, v) for k, v in media.items() if k != "time_mask"), media["time_mask"]
    other, padded = torch.randn_like(given), given.clone()
    padded[1, 1] = torch.randn_like(padded[1, 1])  # the second row's padding item
    with torch.no_grad():
        seen = model(text, **media).logits
        changed = model(text, **{name: other}, time_mask=time_mask).logits
        repadded = model(text, **{name: padded}, time_mask=time_mask).logits
    assert torch.equal(changed[:, :1], seen[:, :1])  # position 0 comes before every <image>
    change = (changed[:, 1:] - seen[:, 1:]).float().abs().amax(dim=-1, keepdim=True)  # (b, n - 1, 1)
    assert (change > (logit_tolerance(seen[:, 1:].float()) if above_tolerance else 0)).all()
    assert torch.equal(repadded, seen)


def check_cached_generation(model: Flamingo, text: Tensor, media: dict, steps: int = 8) -> None:
    """Greedy ``generate`` with its key/value cache against one full forward (no cache) over its output.

    At every step and every vocabulary entry the cached logits lie within ``logit_tolerance`` of the
    full forward's at the same position. The chosen token is the full forward's argmax wherever that
    argmax leads by more than twice the tolerance (elsewhere a near-tie may go either way in bf16, and
    the chosen token's logit must be within twice the tolerance of the best); at least one step is that
    decisive. The top two of V ~ 10^5 random logits lie about sigma / sqrt(2 ln V) = max|z| / 22 = 6 eps max|z|
    apart on average, so near-ties under 8 eps max|z| are common: the strict part is the logits' agreement
    at every entry.
    """
    out = model.generate(
        text,
        **media,
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,  # run all the steps
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens, prompt_length = out.sequences, text.shape[1]
    assert tokens.shape == (text.shape[0], prompt_length + steps)
    check_steps_against_full_forward(model, torch.stack(out.logits, dim=1), tokens, prompt_length, media)


def check_steps_against_full_forward(model: Flamingo, cached: Tensor, tokens: Tensor, start: int, media: dict) -> None:
    """Cached decoding's logits (b, steps, V), from which tokens[:, start:] were chosen greedily, against one
    full forward over ``tokens`` (b, start + steps): within ``logit_tolerance`` at every entry; the chosen
    token is the full forward's argmax wherever that leads by more than twice the tolerance (at least once)."""
    with torch.no_grad():
        full = model(tokens, **media).logits[:, start - 1 : -1].float()  # (b, steps, V)
    tolerance = logit_tolerance(full)
    assert ((cached.float() - full).abs() <= tolerance).all()
    full[..., MEDIA] = float("-inf")  # generation never emits <image>
    chosen, top2 = tokens[:, start:], full.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * tolerance[..., 0]  # (b, steps)
    assert decisive.any()
    assert torch.equal(chosen[decisive], full.argmax(dim=-1)[decisive])
    assert (full.gather(-1, chosen[..., None]) >= top2[..., :1] - 2 * tolerance).all()  # near-ties: within reach


def check_conversation(model: Flamingo, text: Tensor, media: dict, steps: int = 4) -> None:
    """The same prompt as a two-turn conversation (``prefill``, ``extend``, ``generate_from``): the first
    turn holds each row's first image; the second turn row 0's second image and row 1's padded item
    slot. The logits each reply token is chosen from are checked like cached generation's."""
    (name, given), time_mask = next((k, v) for k, v in media.items() if k != "time_mask"), media["time_mask"]
    state = model.prefill(text[:, :5], **{name: given[:, :1]}, time_mask=time_mask[:, :1])
    model.extend(state, text[:, 5:], **{name: given[:, 1:]}, time_mask=time_mask[:, 1:])
    reply, cached = reply_with_logits(model, state, steps)  # (b, steps), (b, steps, V)
    check_steps_against_full_forward(model, cached, torch.cat((text, reply), dim=1), text.shape[1], media)


def check_flamingo(lm: nn.Module, media: dict, *, above_tolerance: bool = True, **kwargs) -> Flamingo:
    """Closed gates: the bare LM's logits exactly; open gates: the images matter, cached generation agrees.

    With ``above_tolerance`` the images must move the logits by more than the generation check's
    tolerance, so that a decoding step reading the wrong media could not hide in it (true of random
    1152-wide features; a random one-layer encoder maps random images to features that differ less).
    """
    text = prompt()
    with torch.no_grad():
        bare = lm(input_ids=text).logits  # before wrapping
    model = wrap(lm, **kwargs)
    with torch.no_grad():
        closed = model(text, **media).logits
    assert closed.dtype == torch.bfloat16 and torch.equal(closed, bare)
    open_gates(model, 1.0)
    check_images_matter(model, text, media, above_tolerance=above_tolerance)
    check_cached_generation(model, text, media)
    check_conversation(model, text, media)
    return model


@pytest.fixture(autouse=True)
def free_models():
    """Free each test's models before the next test builds its own (a Flamingo and its language model
    refer to each other through the model's forward hook, so only the cycle collector frees them)."""
    yield
    gc.collect()
