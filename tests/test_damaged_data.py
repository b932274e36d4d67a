"""Damaged and malformed shards (shards.py, data.py): each raises an error naming the shard and the sample,
or, with ``on_error="skip"``, is skipped, counted and logged; nothing is lost silently."""

from __future__ import annotations

import json
import logging
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset", reason='pip install "flamingo-pytorch[data]"')
pytest.importorskip("PIL")

from test_data import KEYS, Words, hugging_face_words, numbered_image, row_documents

from flamingo_pytorch.data import DocumentLoader
from flamingo_pytorch.shards import DamagedShardError, interleaved_sample, write_shards


def test_a_broken_sample_is_named(tmp_path):
    good = interleaved_sample("0001", [numbered_image(1, 0), "doc 1"])
    broken = {**interleaved_sample("0002", [numbered_image(2, 0), "doc 2"]), "0.png": b"not a png"}
    shards = write_shards([good, broken], tmp_path)
    loader = DocumentLoader(shards, Words(), batch_size=2, max_tokens=8, max_images=1, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match=r"shard-000000.tar, sample 0002"):
        list(loader)


def one_image_shards(directory, count: int = 4) -> list[str]:
    """``count`` shards of 8 documents ``intro <image> doc N``, N = 0 ... 8 count - 1."""
    samples = (interleaved_sample(f"{doc:04d}", ["intro", numbered_image(doc, 0), f"doc {doc}"]) for doc in range(32))
    return write_shards(islice(samples, 8 * count), directory, samples_per_shard=8)


def damage(shard: str, sample: int, how: str) -> None:
    """Cut the shard just before ``sample``'s first member, or write garbage over that member's header."""
    with tarfile.open(shard) as archive:
        offset = [member.offset for member in archive.getmembers()][2 * sample]  # two files a sample
    data = bytearray(Path(shard).read_bytes())
    if how == "cut":
        del data[offset:]
    else:
        data[offset : offset + 512] = bytes(range(256)) * 2
    Path(shard).write_bytes(bytes(data))


def test_a_damaged_shard_raises_naming_it_or_is_skipped_counted_and_logged(tmp_path, caplog):
    shards = one_image_shards(tmp_path)
    damage(shards[1], 2, "cut")  # at a member boundary: tarfile alone reads samples 8, 9 and stops quietly
    damage(shards[2], 5, "garbage")  # tarfile alone reads samples 16 ... 20 and stops quietly
    settings = dict(batch_size=2, max_tokens=8, max_images=1, shuffle_buffer=0)
    for shard, member in ((shards[1], "0009.json"), (shards[2], "0020.json")):
        with pytest.raises(DamagedShardError, match=f"shard {shard} is truncated or damaged after member {member}"):
            list(DocumentLoader([shards[0], shard], Words(), **settings))
    kept = [*range(8), 8, *range(16, 20), *range(24, 32)]  # the sample being read at the damage goes too
    with caplog.at_level(logging.WARNING, logger="flamingo_pytorch.data"):
        loader = DocumentLoader(shards, Words(), **settings, on_error="skip")
        assert sorted(row_documents(loader)) == kept and loader.skipped == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and all("skipping the rest of the shard" in warning for warning in warnings)
    assert shards[1] in warnings[0] and shards[2] in warnings[1]
    # with workers (which count in their own processes), resumed in the middle: the same batches and count
    expected = list(DocumentLoader(shards, Words(), **settings, num_workers=2, on_error="skip"))
    interrupted = DocumentLoader(shards, Words(), **settings, num_workers=2, on_error="skip")
    head = list(islice(iter(interrupted), 5))
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = DocumentLoader(shards, Words(), **settings, num_workers=2, on_error="skip")
    resumed.load_state_dict(state)
    assert resumed.skipped == state["skipped"] == interrupted.skipped
    rest = list(resumed)
    assert len(head + rest) == len(expected) == 11
    assert all(torch.equal(a[name], b[name]) for a, b in zip(head + rest, expected) for name in KEYS)
    assert resumed.skipped == resumed.state_dict()["skipped"] == 2 and resumed.state_dict()["epoch"] == 1


def test_malformed_documents_raise_naming_the_shard_and_sample_or_are_skipped(tmp_path):
    tokenizer = hugging_face_words()  # it reads any string: a malformed document would vanish without a check
    good = [interleaved_sample(f"{i}", [numbered_image(i, 0), "a cat"]) for i in range(3)]
    malformed = {
        "4": b'{"parts": "a cat"}',  # a string, not a list
        "5": b'{"parts": ["a", {"image": "9.png"}]}',  # no such file
        "6": b'{"parts": ["a", {"image": "0.png", "alt": "x"}]}',  # not {"image": NAME}
        "7": b'["a cat"]',  # the parts without their object
        "8": b'{"parts": ["a cat"',  # not JSON
    }
    for key, document in malformed.items():
        shards = write_shards([*good, {**good[0], "__key__": key, "json": document}], tmp_path / key)
        loader = DocumentLoader(shards, tokenizer, batch_size=4, max_tokens=8, max_images=1, shuffle_buffer=0)
        with pytest.raises(ValueError, match=f"shard {shards[0]}, sample {key}"):
            list(loader)
        skipping = DocumentLoader(shards, tokenizer, batch_size=4, max_tokens=8, max_images=1, on_error="skip")
        assert len(next(iter(skipping))["input_ids"]) == 3 and skipping.skipped == 1


def test_an_image_of_another_size_is_named(tmp_path):
    samples = [
        interleaved_sample("0000", [numbered_image(0, 0), "doc 0"], image_format="npy"),
        interleaved_sample("0001", [torch.zeros(3, 6, 6), "doc 1"], image_format="npy"),
    ]
    shards = write_shards(samples, tmp_path)
    loader = DocumentLoader(shards, Words(), batch_size=2, max_tokens=8, max_images=1, shuffle_buffer=0)
    message = rf"shard {shards[0]}, sample 0001: image 0.npy is \(3, 6, 6\) after image_transform, but shard .*"
    with pytest.raises(ValueError, match=message + r"sample 0000, image 0.npy in the same batch is \(3, 4, 4\)"):
        list(loader)
