"""Shards and the loader (shards.py, documents.py, data.py): tiny shards written here, read back and checked."""

from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import tiny_image_encoder

from flamingo_pytorch.documents import DocumentTokenizer

wds = pytest.importorskip("webdataset", reason='pip install "flamingo-pytorch[data]"')
pytest.importorskip("PIL")

from flamingo_pytorch.data import DocumentLoader  # noqa: E402
from flamingo_pytorch.shards import (  # noqa: E402
    encode_image,
    interleaved_sample,
    pair_sample,
    sample_parts,
    write_shards,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from shapes_dataset import make_batch, make_tokenizer  # noqa: E402
from write_shards import main as write_shards_main  # noqa: E402
from write_shards import shapes_documents, shapes_pairs  # noqa: E402

KEYS = {"input_ids", "attention_mask", "labels", "images", "time_mask"}
NUM_DOCS, PER_SHARD = 48, 8  # 6 shards of numbered documents
PNG_ATOL = 0.5 / 255  # PNG keeps 8-bit pixels, round(255 x) / 255: off by at most half a step (.npy is exact)


class Words:
    """The minimal tokenizer interface: encode, pad_id, image_id, and here end_of_chunk_id and bos_id too."""

    def __init__(self, *, chunks: bool = True):
        words = ["<pad>", "<image>", "<eoc>", "<s>", "doc", "intro", "end", *map(str, range(NUM_DOCS))]
        self.ids = {word: i for i, word in enumerate(words)}
        self.pad_id, self.image_id = 0, 1
        self.end_of_chunk_id, self.bos_id = (2, 3) if chunks else (None, None)

    def encode(self, text: str) -> list[int]:
        return [self.ids[word] for word in text.split()]


def numbered_image(doc: int, item: int) -> torch.Tensor:
    """A (3, 4, 4) image whose pixels say which document and which of its images it is."""
    return torch.full((3, 4, 4), (doc * 4 + item) / 255)


def numbered_document(doc: int) -> list:
    """Document ``doc``: leading text, then ``doc % 4`` images each followed by ``doc N``; 0 images -> skipped."""
    parts = ["intro"]
    for item in range(doc % 4):
        parts += [numbered_image(doc, item), f"doc {doc}"]
    return parts


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory) -> list[str]:
    samples = (interleaved_sample(f"{doc:04d}", numbered_document(doc)) for doc in range(NUM_DOCS))
    return write_shards(samples, tmp_path_factory.mktemp("numbered"), samples_per_shard=PER_SHARD)


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> dict[str, list[str]]:
    """16 shapes documents of 4 images (as .npy and as .png) in 4 shards, and 16 pairs (.jpg) in 4 shards."""
    root = tmp_path_factory.mktemp("shapes")
    shards = {}
    for image_format in ("npy", "png"):
        samples = (
            interleaved_sample(f"{i:04d}", parts, image_format=image_format)
            for i, parts in enumerate(shapes_documents(16, 4, seed=0))
        )
        shards[image_format] = write_shards(samples, root / image_format, samples_per_shard=4)
    pairs = (pair_sample(f"{i:04d}", image, text) for i, (image, text) in enumerate(shapes_pairs(16, seed=0)))
    shards["pairs"] = write_shards(pairs, root / "pairs", samples_per_shard=4)
    return shards


def row_documents(batches) -> list[int]:
    """The document number of each row (from its ``doc N`` words)."""
    words = Words()
    return [int(row[row >= words.ids["0"]][0]) - words.ids["0"] for batch in batches for row in batch["input_ids"]]


def numbered_loader(shards, **options) -> DocumentLoader:
    settings = dict(batch_size=5, max_tokens=12, max_images=3, num_workers=2, seed=3, shuffle_buffer=4)
    return DocumentLoader(shards, Words(), **{**settings, **options})


def test_the_json_schema_and_reading_back():
    files = interleaved_sample("k", ["a", numbered_image(1, 2), "b"], image_format="npy")
    assert set(files) == {"__key__", "json", "0.npy"}
    assert json.loads(files["json"]) == {"parts": ["a", {"image": "0.npy"}, "b"]}
    parts = sample_parts(files)
    assert parts[0] == "a" and parts[2] == "b"
    torch.testing.assert_close(parts[1].decode(), numbered_image(1, 2), rtol=0, atol=0)
    pair = sample_parts(pair_sample("k", numbered_image(0, 1), "a caption", image_format="png"))
    assert pair[1] == "a caption" and pair[0].name == "png"


def test_shapes_batches_are_the_generated_task_with_its_pixels(shapes_shards):
    reference = make_batch(16, 4, make_tokenizer(), torch.Generator().manual_seed(0))
    for image_format, atol in (("npy", 0.0), ("png", PNG_ATOL)):
        loader = DocumentLoader(
            shapes_shards[image_format], make_tokenizer(), batch_size=6, max_tokens=24, max_images=4, shuffle_buffer=0
        )
        batches = list(loader)
        assert [len(batch["input_ids"]) for batch in batches] == [6, 6, 4]
        for batch in batches:
            assert set(batch) == KEYS
            assert {name: value.dtype for name, value in batch.items()} == {
                "input_ids": torch.long,
                "attention_mask": torch.long,
                "labels": torch.long,
                "images": torch.float32,
                "time_mask": torch.bool,
            }
            assert batch["images"].shape[1:] == (4, 3, 32, 32) and batch["time_mask"].all()
        torch.testing.assert_close(torch.cat([batch["input_ids"] for batch in batches]), reference.text)
        images = torch.cat([batch["images"] for batch in batches])
        torch.testing.assert_close(images, reference.images, rtol=0, atol=atol)


def test_pairs_are_one_image_and_its_caption(shapes_shards):
    tokenizer = make_tokenizer()
    loader = DocumentLoader(shapes_shards["pairs"], tokenizer, batch_size=16, max_tokens=8, max_images=2)
    (batch,) = list(loader)
    assert batch["time_mask"].tolist() == [[True, False]] * 16 and not batch["images"][:, 1].any()
    captions = sorted(tokenizer.decode(row[1:6]) for row in batch["input_ids"])  # <image> + 5 words
    assert captions == sorted(text for _, text in shapes_pairs(16, seed=0))
    assert (batch["input_ids"][:, 0] == tokenizer.image_id).all() and (
        batch["input_ids"][:, 6:] == tokenizer.pad_id
    ).all()


def test_capping_and_truncation_keep_each_image_with_its_token():
    words = Words()
    a, b, c = object(), object(), object()  # three images (never decoded here)
    parts = ["intro", a, "doc 1 2", b, "doc 3", c, "end"]

    def run(max_tokens: int, max_images: int, min_images: int = 1):
        return DocumentTokenizer(words, max_tokens=max_tokens, max_images=max_images, min_images=min_images)(parts)

    s, i, e = words.bos_id, words.image_id, words.end_of_chunk_id
    intro, doc, one, two, three, end = (words.ids[word] for word in ("intro", "doc", "1", "2", "3", "end"))
    full = [s, intro, i, doc, one, two, e, i, doc, three, e, i, end, e]
    assert run(100, 3) == (full, [a, b, c])
    assert run(100, 2) == (full[:11], [a, b])  # the third image goes with its text; the second chunk's end stays
    assert run(100, 1) == (full[:7], [a])
    assert run(9, 3) == (full[:9], [a, b])  # a cut inside the second chunk: both images keep their tokens
    assert run(8, 3) == (full[:7], [a])  # the cut leaves <image> last: it goes, and its image with it
    assert run(3, 3) is None  # no image left: skipped
    assert run(11, 3, min_images=3) is None
    plain = DocumentTokenizer(Words(chunks=False), max_tokens=100, max_images=3)(parts)  # no BOS, no chunk ends
    assert plain == ([intro, i, doc, one, two, i, doc, three, i, end], [a, b, c])


def test_truncated_rows_hold_as_many_image_tokens_as_images_and_mask_the_labels(numbered_shards):
    words = Words()
    for max_tokens, max_images in ((6, 2), (7, 3), (10, 1), (30, 3)):
        loader = numbered_loader(numbered_shards, max_tokens=max_tokens, max_images=max_images, num_workers=0)
        for batch in loader:
            ids, images, time_mask = batch["input_ids"], batch["images"], batch["time_mask"]
            is_image = ids == words.image_id
            assert torch.equal(is_image.sum(1), time_mask.sum(1)) and time_mask.any(1).all()
            assert torch.equal(time_mask, time_mask.cummin(dim=1).values)  # images first, then padding
            padding = batch["attention_mask"] == 0
            before_first_image = is_image.cumsum(1) == 0
            expected = ids.masked_fill(padding | is_image | before_first_image, -100)
            assert torch.equal(batch["labels"], expected)
            assert (before_first_image[:, :2]).all() and (ids[:, 0] == words.bos_id).all()  # BOS and "intro"
            assert torch.equal(padding, ids == words.pad_id)
            lengths = (~padding).sum(1)
            assert not is_image[torch.arange(len(ids)), lengths - 1].any()  # no <image> left without text
            for row, document in enumerate(row_documents([batch])):  # the images, in order, of that document
                count = int(time_mask[row].sum())
                expected_images = torch.stack([numbered_image(document, item) for item in range(count)])
                torch.testing.assert_close(images[row, :count], expected_images, rtol=0, atol=PNG_ATOL)
                assert not images[row, count:].any()


def test_two_workers_read_every_document_once_and_two_ranks_split_them(numbered_shards):
    with_images = [doc for doc in range(NUM_DOCS) if doc % 4]
    assert sorted(row_documents(numbered_loader(numbered_shards))) == with_images
    ranks = [set(row_documents(numbered_loader(numbered_shards, rank=r, world_size=2))) for r in range(2)]
    assert not ranks[0] & ranks[1] and sorted(ranks[0] | ranks[1]) == with_images


def test_same_seed_same_batches_and_another_seed_another_order(numbered_shards):
    first = list(numbered_loader(numbered_shards))
    again = list(numbered_loader(numbered_shards))
    assert all(torch.equal(a[name], b[name]) for a, b in zip(first, again) for name in KEYS)
    assert row_documents(first) == row_documents(again)
    assert row_documents(numbered_loader(numbered_shards, seed=4)) != row_documents(first)


@pytest.mark.parametrize(
    "num_workers, per_epoch, stops",
    [
        (2, 8, (3, 8, 11)),  # 3 shards a worker: 4 batches each (the last partial)
        pytest.param(  # 2, 2, 1, 1 shards: workers 2 and 3 run out after 2 batches, the others after 3
            4, 10, (7, 9), marks=pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker")
        ),
        (0, 8, (5,)),
    ],
)
def test_resuming_from_the_saved_position_gives_the_batches_that_would_have_come(
    numbered_shards, num_workers, per_epoch, stops
):
    uninterrupted = numbered_loader(numbered_shards, num_workers=num_workers)
    expected = [*uninterrupted, *uninterrupted]  # two epochs
    assert len(expected) == 2 * per_epoch
    for stop in stops:  # inside the first epoch, at its end, or inside the second
        interrupted = numbered_loader(numbered_shards, num_workers=num_workers)
        consumed = list(interrupted) if stop >= per_epoch else []
        consumed += list(islice(iter(interrupted), stop - len(consumed)))
        state = json.loads(json.dumps(interrupted.state_dict()))  # it survives a checkpoint as JSON
        resumed = numbered_loader(numbered_shards, num_workers=num_workers)
        resumed.load_state_dict(state)
        rest = list(resumed) + (list(resumed) if stop < per_epoch else [])
        assert len(consumed) == stop and len(consumed) + len(rest) == len(expected)
        assert all(torch.equal(a[name], b[name]) for a, b in zip(consumed + rest, expected) for name in KEYS)


def test_a_flamingo_palm_step_on_a_batch(shapes_shards):
    from flamingo_pytorch import FlamingoPaLM

    tokenizer = make_tokenizer()
    batch = next(iter(DocumentLoader(shapes_shards["png"], tokenizer, batch_size=4, max_tokens=24, max_images=4)))
    model = FlamingoPaLM(
        num_tokens=len(tokenizer),
        dim=32,
        depth=2,
        dim_head=8,
        heads=4,
        media_token_id=tokenizer.image_id,
        perceiver_num_latents=4,
        perceiver_depth=1,
        perceiver_num_time_embeds=4,
        img_encoder=tiny_image_encoder(),  # 32 x 32 images -> 64 patches
    )
    targets = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    loss = model(batch["input_ids"], batch["images"], time_mask=batch["time_mask"], labels=targets)
    loss.backward()
    assert torch.isfinite(loss)


def test_bad_arguments_raise(numbered_shards, monkeypatch):
    with pytest.raises(ValueError, match="6 shards cannot feed world_size=2 x 4 workers"):
        numbered_loader(numbered_shards, world_size=2, rank=1, num_workers=4)
    with pytest.raises(ValueError, match="num_workers=0 but this loader has 2"):
        numbered_loader(numbered_shards).load_state_dict(numbered_loader(numbered_shards, num_workers=0).state_dict())
    with pytest.raises(TypeError, match="lacks"):
        DocumentLoader(numbered_shards, object(), batch_size=2, max_tokens=8, max_images=2)
    with pytest.raises(ValueError, match="min_images"):
        DocumentTokenizer(Words(), max_tokens=8, max_images=2, min_images=3)
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(ImportError, match=r"flamingo-pytorch\[data\]"):
        numbered_loader(numbered_shards)


def hugging_face_words():
    """A word-level transformers tokenizer of a few words (any other word is [UNK]), with <image>, <|endofchunk|>
    and a pad token."""
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
    tokenizers = pytest.importorskip("tokenizers")
    from flamingo_pytorch.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

    words = ["[UNK]", "a", "cat", "dog", "the", "end"]
    model = tokenizers.models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, END_OF_CHUNK_TOKEN], "pad_token": "<PAD>"})
    return tokenizer


def test_a_hugging_face_tokenizer_gives_the_processors_rows(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
    from flamingo_pytorch.processor import FlamingoProcessor
    from flamingo_pytorch.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

    tokenizer = hugging_face_words()
    documents = [
        ["the", numbered_image(0, 0), "a cat", numbered_image(0, 1), "a dog"],
        [numbered_image(1, 0), "the end"],
    ]
    shards = write_shards((interleaved_sample(f"{i}", parts) for i, parts in enumerate(documents)), tmp_path / "hf")
    (batch,) = list(DocumentLoader(shards, tokenizer, batch_size=2, max_tokens=12, max_images=2, shuffle_buffer=0))
    prompts = [
        f"the{IMAGE_TOKEN}a cat{END_OF_CHUNK_TOKEN}{IMAGE_TOKEN}a dog{END_OF_CHUNK_TOKEN}",
        f"{IMAGE_TOKEN}the end{END_OF_CHUNK_TOKEN}",
    ]
    images = [[numbered_image(0, 0), numbered_image(0, 1)], [numbered_image(1, 0)]]
    expected = FlamingoProcessor(tokenizer, image_transform=lambda image: image)(prompts, images, training=True)
    n = expected["input_ids"].shape[1]  # 8; the loader pads to max_tokens
    for name in ("input_ids", "attention_mask", "labels", "time_mask"):
        torch.testing.assert_close(batch[name][:, :n], expected[name])
    assert (batch["labels"][:, n:] == -100).all() and (batch["input_ids"][:, n:] == tokenizer.pad_token_id).all()
    torch.testing.assert_close(batch["images"], expected["images"], rtol=0, atol=PNG_ATOL)
    tokenizer.add_special_tokens({"bos_token": "<s>"})  # a BOS goes first, with no loss
    (batch,) = list(DocumentLoader(shards, tokenizer, batch_size=2, max_tokens=12, max_images=2, shuffle_buffer=0))
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all() and (batch["labels"][:, 0] == -100).all()
    torch.testing.assert_close(batch["input_ids"][:, 1 : n + 1], expected["input_ids"])

    from einops.layers.torch import Rearrange

    from flamingo_pytorch import Flamingo

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 2, stride=2), Rearrange("B e h w -> B (h w) e"))
    model = Flamingo(
        transformers.LlamaForCausalLM(config),
        media_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_encoder=encoder,
        media_dim=16,
        heads=2,
        dim_head=8,
        perceiver_depth=1,
        perceiver_num_latents=2,
        perceiver_num_time_embeds=2,
    )
    loss = model(**batch).loss  # the batch's keys are Flamingo's arguments; the language model shifts the labels
    loss.backward()
    assert torch.isfinite(loss)


def test_the_tool_stores_your_image_files_as_they_are(tmp_path):
    files = {}
    for name, image in (("red.png", numbered_image(1, 0)), ("blue.npy", numbered_image(2, 1))):
        _, files[name] = encode_image(image, name.split(".")[1])
        (tmp_path / name).write_bytes(files[name])
    lines = [{"parts": ["intro", {"image": "red.png"}, "doc 1"]}, {"image": "blue.npy", "caption": "doc 2"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    shards = write_shards_main([str(tmp_path / "shards"), "--jsonl", str(tmp_path / "docs.jsonl")])
    samples = list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))
    assert [sorted(name for name in sample if not name.startswith("__")) for sample in samples] == [
        ["0.png", "json"],
        ["npy", "txt"],
    ]
    assert samples[0]["0.png"] == files["red.png"] and samples[1]["npy"] == files["blue.npy"]
    (batch,) = list(DocumentLoader(shards, Words(), batch_size=2, max_tokens=6, max_images=1, shuffle_buffer=0))
    assert row_documents([batch]) == [1, 2]
    torch.testing.assert_close(batch["images"][:, 0], torch.stack([numbered_image(1, 0), numbered_image(2, 1)]))


def test_forever_runs_epoch_after_epoch_and_resumes(numbered_shards):
    expected = [*(loader := numbered_loader(numbered_shards, num_workers=0)), *loader, *loader]
    steps = numbered_loader(numbered_shards, num_workers=0)
    head = list(islice(steps.forever(), 11))
    resumed = numbered_loader(numbered_shards, num_workers=0)
    resumed.load_state_dict(steps.state_dict())
    assert steps.state_dict()["epoch"] == 1
    tail = list(islice(resumed.forever(), 13))
    assert len(head + tail) == len(expected) == 24
    assert all(torch.equal(a[name], b[name]) for a, b in zip(head + tail, expected) for name in KEYS)
    empty = numbered_loader(numbered_shards, num_workers=0, min_images=3, max_tokens=6)  # 6 tokens hold 1 image
    with pytest.raises(RuntimeError, match="no batch in a whole epoch"):
        next(empty.forever())


def test_packed_rows_are_consecutive_documents_each_with_its_own_loss_masking(numbered_shards):
    words = Words()
    loader = numbered_loader(numbered_shards, pack=True, max_tokens=16, max_images=3, num_workers=0, shuffle_buffer=0)
    batches = list(loader)
    ids, labels = torch.cat([b["input_ids"] for b in batches]), torch.cat([b["labels"] for b in batches])
    images, time_mask = torch.cat([b["images"] for b in batches]), torch.cat([b["time_mask"] for b in batches])
    is_image = ids == words.image_id
    assert torch.equal(is_image.sum(1), time_mask.sum(1))
    rows = []  # each row's documents, read from its text: a document starts at its BOS
    for row in range(len(ids)):
        tokens = ids[row][ids[row] != words.pad_id].tolist()
        starts = [i for i, token in enumerate(tokens) if token == words.bos_id] + [len(tokens)]
        documents = [tokens[a:b] for a, b in zip(starts, starts[1:])]
        expected_labels = []
        for document in documents:
            first_image = document.index(words.image_id)
            expected_labels += [-100 if i < first_image or t == words.image_id else t for i, t in enumerate(document)]
        expected_labels += [-100] * (ids.shape[1] - len(tokens))
        assert labels[row].tolist() == expected_labels
        numbers = [next(t for t in document if t >= words.ids["0"]) - words.ids["0"] for document in documents]
        pictures = [numbered_image(n, item) for n in numbers for item in range(n % 4)]
        torch.testing.assert_close(images[row, : len(pictures)], torch.stack(pictures), rtol=0, atol=PNG_ATOL)
        rows.append([(n, len(document)) for n, document in zip(numbers, documents)])
    assert [n for row in rows for n, _ in row] == [doc for doc in range(NUM_DOCS) if doc % 4]  # in order, once
    for row, following in zip(rows, rows[1:]):  # greedy: the next row's first document did not fit
        n, length = following[0]
        tokens, pictures = sum(size for _, size in row), sum(m % 4 for m, _ in row)
        assert tokens + length > 16 or pictures + n % 4 > 3
    assert len(rows) < 36  # documents did share rows


def test_packed_loader_resumes_exactly(numbered_shards):
    expected = list(numbered_loader(numbered_shards, pack=True, max_tokens=16))
    interrupted = numbered_loader(numbered_shards, pack=True, max_tokens=16)
    head = list(islice(iter(interrupted), 3))
    resumed = numbered_loader(numbered_shards, pack=True, max_tokens=16)
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert len(head + rest) == len(expected) > 4
    assert all(torch.equal(a[name], b[name]) for a, b in zip(head + rest, expected) for name in KEYS)
