"""The tokenizer helpers and the processor, with a tokenizer built here (tokenizers) and PIL images."""

from __future__ import annotations

import pytest
import torch

from flamingo_pytorch import Flamingo
from flamingo_pytorch.processor import FlamingoProcessor
from flamingo_pytorch.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, add_flamingo_tokens

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
tokenizers = pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

WORDS = ["[UNK]", "a", "cat", "dog", "red", "square", "the", "start", "rest", "output", ":", "."]


def tokenizer_and_lm():
    model = tokenizers.models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    lm = transformers.LlamaForCausalLM(config)
    return tokenizer, lm


def to_tensor(image) -> torch.Tensor:
    """A stand-in for an encoder's transform: (3, 16, 16) floats in [0, 1]."""
    data = torch.frombuffer(bytearray(image.convert("RGB").resize((16, 16)).tobytes()), dtype=torch.uint8)
    return data.view(16, 16, 3).permute(2, 0, 1).float() / 255  # (16, 16, 3) -> (3, 16, 16)


def picture(color: str):
    return Image.new("RGB", (20, 24), color)


def test_added_tokens_resize_the_embeddings_and_encode_atomically():
    tokenizer, lm = tokenizer_and_lm()
    image_id, chunk_id = add_flamingo_tokens(tokenizer, lm)
    assert lm.get_input_embeddings().weight.shape[0] == len(tokenizer) == len(WORDS) + 3  # and <PAD>
    ids = tokenizer(f"{IMAGE_TOKEN}a cat{END_OF_CHUNK_TOKEN}", add_special_tokens=False)["input_ids"]
    assert ids == [image_id, WORDS.index("a"), WORDS.index("cat"), chunk_id]


def test_interleaved_prompts_for_generation_and_training():
    tokenizer, lm = tokenizer_and_lm()
    image_id, chunk_id = add_flamingo_tokens(tokenizer, lm)
    processor = FlamingoProcessor(tokenizer, to_tensor)
    red, blue, green = picture("red"), picture("blue"), picture("green")
    prompts = [[red, "output : a cat .", END_OF_CHUNK_TOKEN, blue, "output :"], f"the start {IMAGE_TOKEN}output :"]
    with pytest.raises(ValueError, match="list prompts hold their images"):
        processor(prompts, images=[[], [green]])
    batch = processor([prompts[0], [*prompts[1].split(IMAGE_TOKEN)[:1], green, "output :"]])
    pad = tokenizer.pad_token_id
    assert batch["images"].shape == (2, 2, 3, 16, 16)
    assert batch["time_mask"].tolist() == [[True, True], [True, False]]
    assert torch.equal(batch["images"][1, 0], to_tensor(green)) and batch["images"][1, 1].abs().sum() == 0
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths == [10, 5] and batch["input_ids"][1, :5].tolist() == [pad] * 5  # left padding
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [2, 1]

    train = processor(["the start " + IMAGE_TOKEN + "a cat ." + END_OF_CHUNK_TOKEN], images=[[red]], training=True)
    ids, labels = train["input_ids"][0].tolist(), train["labels"][0].tolist()
    assert ids == [WORDS.index("the"), WORDS.index("start"), image_id, 1, 2, WORDS.index("."), chunk_id]
    assert labels == [-100, -100, -100, 1, 2, WORDS.index("."), chunk_id]  # no loss before/at the image
    padded = processor([f"{IMAGE_TOKEN}a", f"{IMAGE_TOKEN}a cat ."], images=[[red], [blue]], training=True)
    assert padded["input_ids"][0, -2:].tolist() == [pad, pad] and padded["labels"][0, -2:].tolist() == [-100, -100]

    model = Flamingo(
        lm, media_token_id=image_id, media_dim=3 * 16, heads=2, perceiver_depth=1, train_token_ids=[image_id, chunk_id]
    )
    features = batch["images"].flatten(3).transpose(2, 3)  # (b, t, 16 * 16 patches of width 3) -> stand-in features
    features = features.reshape(2, 2, 16, 48)  # (b, t, p, e)
    out = model.generate(
        batch["input_ids"],
        image_embeds=features,
        time_mask=batch["time_mask"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=3,
        pad_token_id=pad,
    )
    assert out.shape == (2, 10 + 3) and not (out[:, 10:] == image_id).any()


def test_prompts_whose_image_count_differs_from_their_tokens_raise():
    tokenizer, lm = tokenizer_and_lm()
    add_flamingo_tokens(tokenizer, lm)
    processor = FlamingoProcessor(tokenizer, to_tensor)
    with pytest.raises(ValueError, match="prompt 0 has 2 <image> tokens but 1 images"):
        processor([f"{IMAGE_TOKEN}a{IMAGE_TOKEN}"], images=[[picture("red")]])
    with pytest.raises(ValueError, match="no <image> token"):
        FlamingoProcessor(tokenizer_and_lm()[0], to_tensor)


def test_images_of_another_size_after_the_transform_are_named():
    tokenizer, lm = tokenizer_and_lm()
    add_flamingo_tokens(tokenizer, lm)
    processor = FlamingoProcessor(tokenizer, lambda image: to_tensor(image)[:, : image.width // 2])  # H follows W
    prompts, images = [f"{IMAGE_TOKEN}a", f"{IMAGE_TOKEN}a{IMAGE_TOKEN}"], [[picture("red")]] * 2
    images[1] = [picture("red"), Image.new("RGB", (10, 24), "blue")]
    with pytest.raises(ValueError, match=r"image 1 of row 1 is \(3, 5, 16\), the first image is \(3, 10, 16\)"):
        processor(prompts, images=images)
