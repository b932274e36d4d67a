"""OpenFlamingo checkpoints on our Flamingo: the same logits as OpenFlamingo's own model on the same weights.

OpenFlamingo's ``Flamingo`` is built here, as its factory builds it but without downloads: a tiny
random MPT, GPT-NeoX, Llama or OPT (embeddings narrower than its layers, as OPT-350m's) from
``transformers`` with its ``FlamingoLMMixin`` and a small random open_clip ViT. Its ``state_dict``
(whole, or filtered as its trainer saves the released checkpoints) is loaded with ``load_openflamingo``
onto our ``Flamingo`` over an untouched copy of the same LM and encoder, and both run the same
interleaved batch: several images per row, ``<|endofchunk|>``, left padding. Skipped where
``open-flamingo`` (``pip install --no-deps open-flamingo==2.0.1``) is absent.
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from einops import rearrange
from test_flamingo import FAMILIES

from flamingo_pytorch.openflamingo import add_openflamingo_tokens, load_openflamingo

open_clip = pytest.importorskip("open_clip", reason="pip install -e '.[clip]'")
pytest.importorskip("open_flamingo", reason="pip install --no-deps open-flamingo==2.0.1")
from open_flamingo.src.flamingo import Flamingo as TheirFlamingo  # noqa: E402
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402

MEDIA, END_OF_CHUNK, PAD, VOCAB = 3, 4, 0, 64
LAYERS = {
    "llama": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "opt_projected": "model.decoder.layers",
}
VISION_WIDTH, IMAGE = 48, 32


def tiny_clip():
    vision = open_clip.CLIPVisionCfg(layers=1, width=VISION_WIDTH, head_width=16, image_size=IMAGE, patch_size=8)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=32, width=16, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text).eval()


def opt_projected():
    """OPT-350m's layout in small: embeddings 16 wide, projected to the decoder layers' 32 and back."""
    import transformers

    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=16,
        num_hidden_layers=3,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return transformers.OPTForCausalLM(config)


def build_theirs(family: str, every: int):
    """(OpenFlamingo's model, as trained: open gates and new token rows; a plain copy of its LM; of its CLIP)."""
    torch.manual_seed(0)
    lm, clip = {**FAMILIES, "opt_projected": opt_projected}[family]().eval(), tiny_clip()
    plain_lm, plain_clip = copy.deepcopy(lm), copy.deepcopy(clip)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(LAYERS[family])
    clip.visual.output_tokens = True  # as their factory sets it
    theirs = TheirFlamingo(clip, lm, END_OF_CHUNK, MEDIA, vis_dim=VISION_WIDTH, cross_attn_every_n_layers=every)
    with torch.no_grad():
        for block in lm.gated_cross_attn_layers:
            if block is not None:
                block.attn_gate.uniform_(0.3, 1.0)
                block.ff_gate.uniform_(0.3, 1.0)
        lm.get_input_embeddings().weight[[MEDIA, END_OF_CHUNK]] = torch.randn(
            2, lm.get_input_embeddings().embedding_dim
        )
    return theirs.eval(), plain_lm, plain_clip


def released(theirs) -> dict[str, torch.Tensor]:
    """The state dict as OpenFlamingo's trainer saves a release: what trains (the resampler, the
    gated blocks once, the input embeddings) and every tensor named like an embedding."""
    weight = theirs.lang_encoder.get_input_embeddings().weight
    embedding = "lang_encoder." + next(n for n, p in theirs.lang_encoder.named_parameters() if p is weight)
    return {
        key: value
        for key, value in theirs.state_dict().items()
        if key.startswith("perceiver.")
        or ".gated_cross_attn_layer." in key
        or key == embedding
        or ("embed" in key and not key.startswith("lang_encoder.old_decoder_blocks."))
    }


def batch():
    torch.manual_seed(1)
    words = lambda n: torch.randint(5, VOCAB, (n,)).tolist()  # noqa: E731
    row0 = [MEDIA, *words(3), END_OF_CHUNK, MEDIA, *words(2), END_OF_CHUNK, MEDIA, *words(2)]
    row1 = [PAD, PAD, PAD, MEDIA, *words(2), END_OF_CHUNK, MEDIA, *words(4)]  # 2 of its 3 images used
    text = torch.tensor([row0, row1])
    return text, (text != PAD).long(), torch.randn(2, 3, 3, IMAGE, IMAGE)  # (b, n), (b, n), (b, t, c, H, W)


TIME_MASK = torch.tensor([[True, True, True], [True, True, False]])  # (b, t): ours is told row 1 has 2 images


def their_logits(theirs, text, mask, images):
    with torch.no_grad():
        return theirs(vision_x=images[:, :, None], lang_x=text, attention_mask=mask).logits


EPS = torch.finfo(torch.float32).eps  # 2^-23: one float32 ulp, relative (a rounding errs by half of it)


def tolerance(want: torch.Tensor) -> torch.Tensor:
    """How far our float32 outputs (logits, or a gated block's) may lie from OpenFlamingo's: 32 eps max|want|.

    The two models do the same arithmetic in other orders: einsum against scaled_dot_product_attention
    in the resampler and the gated blocks, other matmul shapes, the thread count's blocking. Each of the
    about 20 sums on the way (2 resampler layers; 3 decoder layers, each with up to 3 gated-block and
    layer sums after it; the head) is then off by about eps/2 relative to its output's scale, the terms'
    roundings adding like a random walk. Independent, they leave the final hidden state off by about
    sqrt(20) eps/2 = 2.2 eps relative, so each logit by about 2.2 eps times the logits' rms, and the
    largest such error over the positions and vocabulary (about 4.5 standard deviations) by about
    10 eps rms, which is under 10 eps max|z|. 32 eps max|z| covers it with room; the worst measured
    (AMD EPYC, 1 and 2 threads) is 7.3 eps max|z|. max|z| ranges from 0.3 (Llama) to 28 (MPT, whose
    tied head meets the embedding rows added at scale 1) here: a fixed 1e-5 was too tight for MPT.
    """
    return 32 * EPS * want.abs().max()


def assert_same_logits(ours, theirs) -> None:
    """The two models' logits on ``batch()`` agree within ``tolerance`` over its real (unpadded) tokens."""
    text, mask, images = batch()
    with torch.no_grad():
        got = ours(text, images, attention_mask=mask, time_mask=TIME_MASK).logits
    real = mask.bool()
    want = their_logits(theirs, text, mask, images)[real]
    assert (got[real] - want).abs().max() <= tolerance(want)


CASES = [("mpt", 1), ("gpt_neox", 2), ("llama", 1), ("llama", 2), ("opt_projected", 1)]  # OPT-350m-like last


@pytest.mark.parametrize(("family", "every"), CASES)
def test_same_logits_as_openflamingo_from_its_whole_state_dict(family, every):
    theirs, lm, clip = build_theirs(family, every)
    ours = load_openflamingo(theirs.state_dict(), lm, media_token_id=MEDIA, vision_encoder=clip)
    assert ours.cross_attn_layers == list(range(every - 1, 3, every))
    assert_same_logits(ours, theirs)
    text, mask, images = batch()
    real = mask.bool()
    with torch.no_grad():
        without_images = lm(input_ids=text, attention_mask=mask).logits[real]
    want = their_logits(theirs, text, mask, images)[real]
    assert (want - without_images).abs().max() > 1000 * tolerance(want)  # images matter, far beyond rounding


@pytest.mark.parametrize(("family", "every"), CASES[:2])
def test_a_released_checkpoint_file_loads_with_weights_only(family, every, tmp_path):
    theirs, lm, clip = build_theirs(family, every)
    path = tmp_path / "checkpoint.pt"
    torch.save(released(theirs), path)
    ours = load_openflamingo(path, lm, media_token_id=MEDIA, vision_encoder=clip)
    assert_same_logits(ours, theirs)


def test_safetensors_and_refusing_pickled_objects(tmp_path):
    from safetensors.torch import save_file

    theirs, lm, clip = build_theirs("llama", 2)
    path = tmp_path / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in released(theirs).items()}, str(path))
    ours = load_openflamingo(path, lm, media_token_id=MEDIA, vision_encoder=clip)
    assert torch.equal(ours.perceiver_resampler.latents, theirs.perceiver.latents)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"perceiver.latents": torch.zeros(1), "extra": copy.deepcopy}, unsafe)  # a pickled global
    with pytest.raises(ValueError, match=r"unsafe.pt: it holds a pickled Python object \(copy.deepcopy\)") as error:
        load_openflamingo(unsafe, lm, media_token_id=MEDIA, vision_encoder=clip)
    assert_no_advice_to_unpickle(error.value)


def assert_no_advice_to_unpickle(error: BaseException) -> None:
    """Neither the error nor what its traceback prints (causes, contexts) tells the user to run the file's code."""
    printed = "".join(traceback.format_exception(error))
    for advice in ("weights_only=False", "`weights_only` set to `False`", "add_safe_globals", "safe_globals"):
        assert advice not in printed


def test_unreadable_checkpoint_files_raise_one_value_error_naming_the_file(tmp_path):
    """Empty, truncated (at many points), random bytes, as .pt and .safetensors: a ValueError naming the file."""
    from safetensors.torch import save_file

    theirs, lm, clip = build_theirs("llama", 2)
    state = released(theirs)
    torch.save(state, tmp_path / "good.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "good.safetensors"))
    torch.manual_seed(3)
    noise = bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).tolist())
    contents = {}
    for suffix in (".pt", ".safetensors"):
        data = (tmp_path / f"good{suffix}").read_bytes()
        # with torch 2.x, a .pt cut at 0 bytes gives EOFError, at 8192 OSError (Errno 22), elsewhere RuntimeError
        contents.update({f"cut{cut}{suffix}": data[:cut] for cut in (0, 64, 8192, len(data) // 2, len(data) - 1)})
        contents[f"noise{suffix}"] = noise
    for name, data in contents.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"cannot read {path}") as error:
            load_openflamingo(path, lm, media_token_id=MEDIA, vision_encoder=clip)
        assert_no_advice_to_unpickle(error.value)
    load_openflamingo(tmp_path / "good.pt", lm, media_token_id=MEDIA, vision_encoder=clip)  # the intact file loads


def test_a_checkpoint_without_what_gives_the_sizes_is_named_and_leaves_the_lm_alone(tmp_path):
    theirs, lm, clip = build_theirs("llama", 1)
    before = {name: p.detach().clone() for name, p in lm.named_parameters()}
    state = released(theirs)
    block = "lang_encoder.model.layers.1.gated_cross_attn_layer."
    cases = {
        "no_ff.pt": ({k: v for k, v in state.items() if not k.endswith("ff.1.weight")}, "no gated block has its ff.1"),
        "no_q.pt": ({k: v for k, v in state.items() if not k.endswith("to_q.weight")}, "no gated block has its attn"),
        "flat.pt": ({**state, "perceiver.latents": torch.zeros(8)}, r"perceiver.latents has shape \(8,\), want 2"),
        "one_ff.pt": (
            {k: v for k, v in state.items() if k != block + "ff.1.weight"},
            r"missing keys \['gated_cross_attn.1.ff.1.weight'\]",
        ),
    }
    for name, (bad, message) in cases.items():
        torch.save(bad, tmp_path / name)
        with pytest.raises(ValueError, match=f"{tmp_path / name}.*{message}"):
            load_openflamingo(tmp_path / name, lm, media_token_id=MEDIA, vision_encoder=clip)
    with pytest.raises(ValueError, match=r"^the checkpoint: no gated block"):  # a state dict given as it is
        load_openflamingo(cases["no_q.pt"][0], lm, media_token_id=MEDIA, vision_encoder=clip)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in lm.model.layers)
    assert all(p.requires_grad and torch.equal(p, before[name]) for name, p in lm.named_parameters())


def test_unknown_missing_and_misshaped_keys_are_listed_and_the_model_is_left_as_it_was():
    theirs, lm, clip = build_theirs("llama", 1)
    before = {name: p.detach().clone() for name, p in lm.named_parameters()}
    state = released(theirs)
    bad = {**state, "lang_encoder.mystery.weight": torch.zeros(2)}
    del bad["perceiver.norm.weight"]
    bad["lang_encoder.model.embed_tokens.weight"] = torch.zeros(VOCAB + 3, lm.config.hidden_size)
    with pytest.raises(ValueError) as error:
        load_openflamingo(bad, lm, media_token_id=MEDIA, vision_encoder=clip)
    message = str(error.value)
    assert "lm.mystery.weight" in message and "perceiver_resampler.norm.weight" in message
    assert "lm.model.embed_tokens.weight: checkpoint (67, 32), model (64, 32)" in message
    assert "add_openflamingo_tokens" in message
    with pytest.raises(ValueError, match="pass vision_encoder="):
        load_openflamingo(state, lm, media_token_id=MEDIA)
    with pytest.raises(ValueError, match="video checkpoints"):
        load_openflamingo({**state, "perceiver.frame_embs": torch.zeros(2, 48)}, lm, media_token_id=MEDIA)
    # nothing was wrapped, frozen or copied: the same LM then loads the good checkpoint
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in lm.model.layers)
    assert all(p.requires_grad and torch.equal(p, before[name]) for name, p in lm.named_parameters())
    ours = load_openflamingo(state, lm, media_token_id=MEDIA, vision_encoder=clip)
    assert_same_logits(ours, theirs)


def attention_outputs(blocks) -> list[torch.Tensor]:
    """Record each gated block's cross-attention output (its ``to_out`` projection, no bias)."""
    seen = []
    for block in blocks:
        block.attn.to_out.register_forward_hook(lambda module, args, out: seen.append(out))
    return seen


@pytest.mark.parametrize("immediate", [True, False])
def test_where_openflamingo_is_ill_defined_ours_reads_nothing_or_refuses(immediate):
    """Reading all earlier images, OpenFlamingo gives the tokens before the first image a uniform average
    over all images (later ones included): ours gives them exactly zero; elsewhere the two agree. An <image>
    beyond the images given gets the same average from OpenFlamingo (immediate): ours refuses it."""
    theirs, lm, clip = build_theirs("llama", 1)
    ours = load_openflamingo(theirs.state_dict(), lm, media_token_id=MEDIA, vision_encoder=clip)
    blocks = [b for b in theirs.lang_encoder.gated_cross_attn_layers]
    for block in [*blocks, *ours.gated_cross_attn]:
        block.attn.only_attend_immediate_media = immediate
    torch.manual_seed(2)
    text = torch.tensor([[7, 8, MEDIA, 9, 10, END_OF_CHUNK, MEDIA, 11, 12, 13]])  # 2 <image>, 2 images
    images = torch.randn(1, 2, 3, IMAGE, IMAGE)
    theirs_out, ours_out = attention_outputs(blocks), attention_outputs(ours.gated_cross_attn)
    with torch.no_grad():
        want = their_logits(theirs, text, torch.ones_like(text), images)
        got = ours(text, images).logits
    undefined = torch.zeros(text.shape[1], dtype=torch.bool)
    undefined[:2] = not immediate  # before the first image; OpenFlamingo zeroes them itself when immediate
    for mine, other in zip(ours_out, theirs_out):
        assert torch.equal(mine[0, undefined], torch.zeros_like(mine[0, undefined]))
        if undefined.any():
            assert other[0, undefined].abs().amax(dim=-1).min() > 1000 * tolerance(other)
    same = (ours_out[0][0, ~undefined], theirs_out[0][0, ~undefined])  # the first block: the same input there
    assert (same[0] - same[1]).abs().max() <= tolerance(same[1])
    if immediate:  # no token read anything ill-defined
        assert (got - want).abs().max() <= tolerance(want)
    extra = torch.cat((text, torch.tensor([[MEDIA, 14]])), dim=1)  # a third <image> with no third image
    with pytest.raises(ValueError, match="<image>"):
        ours(extra, images)


def test_greedy_generation_equals_argmax_of_full_forwards():
    theirs, lm, clip = build_theirs("gpt_neox", 2)
    ours = load_openflamingo(theirs.state_dict(), lm, media_token_id=MEDIA, vision_encoder=clip)
    text, mask, images = batch()
    out = ours.generate(
        text, images, attention_mask=mask, time_mask=TIME_MASK, max_new_tokens=6, do_sample=False, pad_token_id=PAD
    )
    expected, full_mask = text, mask
    with torch.no_grad():
        for _ in range(6):
            logits = ours(expected, images, attention_mask=full_mask, time_mask=TIME_MASK).logits[:, -1]
            logits[:, MEDIA] = float("-inf")
            expected = torch.cat((expected, logits.argmax(dim=-1, keepdim=True)), dim=1)
            full_mask = torch.cat((full_mask, torch.ones_like(full_mask[:, :1])), dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("beams", [1, 3])
def test_openflamingos_own_generate_gives_our_tokens(beams):
    """On this transformers (5.x), OpenFlamingo's generate runs, greedy and beam search, when a row is padded
    (transformers drops an all-ones mask, which its FlamingoLMMixin.forward requires), and gives our tokens."""
    theirs, lm, clip = build_theirs("llama", 2)
    ours = load_openflamingo(theirs.state_dict(), lm, media_token_id=MEDIA, vision_encoder=clip)
    text, mask, images = batch()  # row 1 is left-padded
    options = dict(max_new_tokens=5, min_new_tokens=5, num_beams=beams, pad_token_id=PAD, eos_token_id=END_OF_CHUNK)
    with torch.no_grad():
        want = theirs.generate(images[:, :, None], text, attention_mask=mask, suppress_tokens=[MEDIA], **options)
    got = ours.generate(text, images, attention_mask=mask, time_mask=TIME_MASK, do_sample=False, **options)
    assert torch.equal(got, want)


def test_added_tokens_take_openflamingos_ids():
    """The same calls as OpenFlamingo's factory give the same ids, so the checkpoint's rows line up."""
    from test_processor import tokenizer_and_lm

    tokenizer, lm = tokenizer_and_lm()
    reference, _ = tokenizer_and_lm()
    image_id, chunk_id = add_openflamingo_tokens(tokenizer, lm)
    reference.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    reference.add_special_tokens({"pad_token": "<PAD>"})
    assert (image_id, chunk_id) == (reference.encode("<image>")[-1], reference.encode("<|endofchunk|>")[-1])
    assert lm.get_input_embeddings().weight.shape[0] == len(reference)


CAPTION_WORDS = ["[UNK]", "Output", ":", "two", "cats", "on", "a", "sofa", ".", "bathroom", "sink"]


def stand_in_tokenizer():
    import tokenizers
    import transformers

    model = tokenizers.models.WordLevel({word: i for i, word in enumerate(CAPTION_WORDS)}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def stand_in_lm():
    import transformers

    torch.manual_seed(0)
    config = transformers.MptConfig(vocab_size=len(CAPTION_WORDS), d_model=32, n_layers=3, n_heads=4, max_seq_len=128)
    return transformers.MptForCausalLM(config).eval()


def to_tensor(image) -> torch.Tensor:
    """PIL image -> (3, IMAGE, IMAGE) in [0, 1], a stand-in for CLIP's preprocessing."""
    import numpy as np

    pixels = torch.from_numpy(np.asarray(image.convert("RGB").resize((IMAGE, IMAGE)), dtype=np.float32))
    return rearrange(pixels, "H W c -> c H W") / 255


def stand_in_clip(name, pretrained):
    torch.manual_seed(1)
    return tiny_clip(), None, to_tensor


def their_factory_model() -> TheirFlamingo:
    """OpenFlamingo's own model over the stand-in MPT and CLIP, built as its factory builds it, gates opened."""
    lm, tokenizer, (clip, _, _) = stand_in_lm(), stand_in_tokenizer(), stand_in_clip("ViT-L-14", "openai")
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("transformer.blocks")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lm.resize_token_embeddings(len(tokenizer))
    clip.visual.output_tokens = True
    ids = [tokenizer.encode(token)[-1] for token in ("<|endofchunk|>", "<image>")]
    model = TheirFlamingo(clip, lm, *ids, vis_dim=VISION_WIDTH, cross_attn_every_n_layers=1).eval()
    with torch.no_grad():
        for block in lm.gated_cross_attn_layers:
            block.attn_gate.fill_(0.7)
            block.ff_gate.fill_(0.4)
    return model


def test_the_docs_block_with_local_stand_ins(tmp_path, monkeypatch):
    """docs/openflamingo.md's OpenFlamingo-3B block as written, with tiny local models where it downloads:
    the checkpoint is OpenFlamingo's own model over the same tiny MPT, built as its factory does."""
    import huggingface_hub
    import transformers
    from PIL import Image
    from test_readme import README, marked_block

    theirs = {}

    def download(repo_id, filename):
        model = their_factory_model()
        with torch.no_grad():
            model.lang_encoder.get_input_embeddings().weight[-3:] = torch.randn(3, 32)
        theirs["model"] = model
        torch.save(released(model), tmp_path / filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", stand_in_clip)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: stand_in_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: stand_in_lm())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.chdir(tmp_path)
    for name, color in (("cats.jpg", "red"), ("sink.jpg", "blue"), ("query.jpg", "green")):
        Image.new("RGB", (40, 30), color).save(name)
    code = marked_block("<!-- stand-ins: tests/test_openflamingo.py", README.parent / "docs" / "openflamingo.md")
    namespace = {}
    exec(compile(code, "docs/openflamingo.md block", "exec"), namespace)
    inputs, out = namespace["inputs"], namespace["out"]
    n = inputs["input_ids"].shape[1]
    assert out.shape[0] == 1 and n < out.shape[1] <= n + 20 and torch.equal(out[:, :n], inputs["input_ids"])
    with torch.no_grad():
        ours = namespace["flamingo"](**inputs).logits
        want = their_logits(theirs["model"], inputs["input_ids"], inputs["attention_mask"], inputs["images"])
    assert (ours - want).abs().max() <= tolerance(want)
