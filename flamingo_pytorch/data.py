"""Loading shards for training: a ``DataLoader`` over webdataset shards of documents and pairs that can resume.

Each epoch, the shards are shuffled (seeded by ``seed`` and the epoch), dealt to ranks
(``shards[rank::world_size]``) and then to the loader's workers (``[worker::num_workers]``); each
worker reads its shards in order through a seeded shuffle buffer, turns samples into rows of one
document, or of several with packing (``documents.DocumentTokenizer``), and makes whole batches,
which the loader hands out round robin. So a seed fixes every batch, every sample is read once per
epoch by exactly one rank and worker, and the loader's position is a few integers: the epoch and how
many batches of each worker were handed out. ``state_dict`` returns it; a new loader built with the
same arguments and given it by ``load_state_dict`` yields exactly the batches the first one would
have yielded next.

A damaged shard (cut short, or a member header overwritten) or a malformed sample raises, naming the shard
and the member or sample; with ``on_error="skip"`` it is skipped instead, logged and counted in the position
(each reader counts from the epoch's start, so a resumed loader counts the same).

Shapes: b batch_size, n max_tokens, t max_images, c channels, H x W pixels.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice

import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flamingo_pytorch.documents import DocumentTokenizer, decode_images, to_tensor
from flamingo_pytorch.shards import DamagedShardError, import_webdataset, read_shard, sample_parts

logger = logging.getLogger(__name__)


class DocumentStream(IterableDataset):
    """One rank's batches from the shards: yields (reader, batch, skipped), skipping what ``start`` says was
    consumed; ``skipped`` counts what the reader has skipped so far this epoch (``on_error="skip"``), and a last
    (reader, None, skipped) reports what it skipped after its last batch.

    A reader is one worker's share of the rank's shards; in a resumed epoch, worker w plays reader
    (w + due) % num_workers, so that the round robin goes on where it stopped.

    Built by ``DocumentLoader``; see it for the arguments.
    """

    def __init__(
        self,
        shards: list[str],
        tokenizer: DocumentTokenizer,
        image_transform: Callable,
        *,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        pack: bool,
        on_error: str = "raise",
    ):
        self.shards, self.tokenizer, self.image_transform = shards, tokenizer, image_transform
        self.on_error, self.skipped = on_error, 0
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size, self.drop_last, self.pack = rank, world_size, drop_last, pack
        self.start = (0, [0], 0)  # (epoch, batches handed out per reader, the reader due next): set by the loader

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """The shards that ``worker`` of this rank reads in ``epoch``, in reading order."""
        shards = list(self.shards)
        if self.shuffle_buffer > 1:
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(shards)
        return shards[self.rank :: self.world_size][worker::num_workers]

    def samples(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict]:
        """This worker's raw samples (file name -> bytes), shuffled through the seeded buffer."""
        wds = import_webdataset()
        stages = [wds.SimpleShardList(self.worker_shards(epoch, worker, num_workers)), self.read_shards]
        if self.shuffle_buffer > 1:
            seed = f"samples-{self.seed}-{epoch}-{self.rank}-{worker}"
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed))
        return iter(wds.DataPipeline(*stages))

    def read_shards(self, sources: Iterable[dict]) -> Iterator[dict]:
        """Each shard's samples; a damaged shard raises, or with ``on_error="skip"`` ends where it is damaged."""
        for source in sources:
            try:
                yield from read_shard(source["url"])
            except DamagedShardError as error:
                self.skip(error, "the rest of the shard")

    def skip(self, error: Exception, what: str) -> None:
        """Raise ``error`` (``on_error="raise"``), or count and log what is skipped."""
        if self.on_error == "raise":
            raise error
        self.skipped += 1
        logger.warning("skipping %s (%d skipped by this reader this epoch): %s", what, self.skipped, error)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Tensor] | None, int]]:
        info = get_worker_info()
        epoch, consumed, due = self.start
        # the DataLoader asks its workers round robin from worker 0, so worker 0 plays the reader due next
        worker, num_workers = (0, 1) if info is None else ((info.id + due) % info.num_workers, info.num_workers)
        rows, self.skipped, reported = [], 0, 0
        # the rows handed out before a resumption are tokenized to count them, never decoded
        for row in islice(self.rows(epoch, worker, num_workers), consumed[worker] * self.batch_size, None):
            rows.append(row)
            if len(rows) == self.batch_size:
                reported = self.skipped
                yield worker, self.batch(rows), reported
                rows = []
        if rows and not self.drop_last:
            reported = self.skipped
            yield worker, self.batch(rows), reported
        if self.skipped > reported:
            yield worker, None, self.skipped

    def rows(self, epoch: int, worker: int, num_workers: int) -> Iterator[list[tuple[list[int], list]]]:
        """This worker's rows, images not decoded: each a list of documents (ids, images), one unless packing."""
        documents = (self.read(sample) for sample in self.samples(epoch, worker, num_workers))
        documents = (document for document in documents if document is not None)
        return self.tokenizer.pack(documents) if self.pack else ([document] for document in documents)

    def read(self, sample: dict) -> tuple[list[int], list] | None:
        """A raw sample -> its token ids and undecoded images, or None when it is skipped."""
        where = f"shard {sample.get('__url__')}, sample {sample.get('__key__')}"
        try:
            parts = sample_parts(sample)  # a ValueError naming the shard and sample if malformed
            try:
                return self.tokenizer(parts)
            except Exception as error:
                raise RuntimeError(f"could not read {where}: {error}") from error
        except (ValueError, RuntimeError) as error:
            self.skip(error, where)
            return None

    def batch(self, rows: list[list[tuple[list[int], list]]]) -> dict[str, Tensor]:
        """Rows of documents (ids, undecoded images) -> the batch, its images decoded, all of one shape."""
        first, decoded = None, []  # first: the shape of the batch's first image, and where it is
        for row in rows:
            decoded.append([])
            for ids, images in row:
                tensors = self.decode(images)
                for image, tensor in zip(images, tensors):
                    first = first or (tuple(tensor.shape), f"{image.source}, image {image.name}")
                    if tuple(tensor.shape) != first[0]:
                        raise ValueError(
                            f"{image.source}: image {image.name} is {tuple(tensor.shape)} after image_transform, "
                            f"but {first[1]} in the same batch is {first[0]}: make image_transform resize to one size"
                        )
                decoded[-1].append((ids, tensors))
        return self.tokenizer.collate(decoded)

    def decode(self, images: list) -> list[Tensor]:
        try:
            return decode_images(images, self.image_transform)
        except Exception as error:
            raise RuntimeError(f"could not read an image of {images[0].source}: {error}") from error


class DocumentLoader(DataLoader):
    """A ``DataLoader`` of interleaved documents and image-text pairs from webdataset shards.

    Yields dicts with ``input_ids`` (b, n) long, ``attention_mask`` (b, n) long, ``labels`` (b, n) long
    (-100: no loss; aligned with ``input_ids``, so shift them for a model that does not shift itself),
    ``images`` (b, t, c, H, W) float and ``time_mask`` (b, t) bool. n and t are always ``max_tokens``
    and ``max_images``. Each ``iter()`` continues from the loader's position: the rest of the epoch
    if one was left unfinished (or loaded), else the next epoch.

    Args:
        shards: shard paths or URLs, or one brace pattern (``"data/shard-{000000..000099}.tar"``).
        tokenizer: a Hugging Face tokenizer or a plain one; see ``DocumentTokenizer``.
        batch_size: b, rows per batch; every batch comes from one worker's shards.
        max_tokens: n, tokens per row (cut, never cutting an image's ``<image>`` from it).
        max_images: t, images per row (more are dropped with their text).
        min_images: documents left with fewer images are skipped.
        image_transform: a decoded image (RGB PIL image, or float tensor from ``.npy``) -> (c, H, W)
            tensor, e.g. a ``FlamingoProcessor``'s; by default pixels in [0, 1].
        num_workers: worker processes (0: read in this process).
        seed: fixes the shard order, the shuffle buffers, hence every batch.
        shuffle_buffer: samples each worker shuffles among; 0 or 1 reads shards and samples in order.
        rank, world_size: this process's share of the shards; from ``torch.distributed`` when None.
        drop_last: drop each worker's last, partial batch of an epoch.
        pack: fill each row with as many consecutive documents as fit (see ``DocumentTokenizer.pack``),
            rather than one document a row. Packed documents see the earlier ones of their row in
            self-attention; each has its own loss masking.
        pin_memory: as for ``DataLoader``.
        on_error: ``"raise"`` (default): a damaged shard (truncated, or a member header overwritten) or a
            malformed sample (not a document or pair of the schema in ``shards.py``, or failing to tokenize)
            raises, naming the shard and the member or sample. ``"skip"``: skip it (a damaged shard's rest,
            from the damage on) and go on; each skip is logged (``logging``, this module's logger) and
            counted in ``skipped`` and the ``state_dict``. Images that fail to decode always raise.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        tokenizer,
        *,
        batch_size: int,
        max_tokens: int,
        max_images: int,
        min_images: int = 1,
        image_transform: Callable | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        pack: bool = False,
        pin_memory: bool = False,
        on_error: str = "raise",
    ):
        import_webdataset()  # fail here rather than in a worker
        shards = expand_shards(shards)
        rank, world_size = resolve_rank(rank, world_size)
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        readers = world_size * max(num_workers, 1)
        if len(shards) < readers:
            raise ValueError(
                f"{len(shards)} shards cannot feed world_size={world_size} x {max(num_workers, 1)} workers: "
                f"write at least {readers} shards"
            )
        documents = DocumentTokenizer(tokenizer, max_tokens=max_tokens, max_images=max_images, min_images=min_images)
        stream = DocumentStream(
            shards,
            documents,
            to_tensor if image_transform is None else image_transform,
            batch_size=batch_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            pack=pack,
            on_error=on_error,
        )
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self.readers = max(num_workers, 1)
        self.epoch, self.consumed, self.due = 0, [0] * self.readers, 0
        self.skipped_before, self.skipped_now = 0, [0] * self.readers  # earlier epochs; each reader's, this epoch

    @property
    def skipped(self) -> int:
        """How many damaged shards' rests and malformed samples were skipped (``on_error="skip"``) up to here."""
        return self.skipped_before + sum(self.skipped_now)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        self.dataset.start = (self.epoch, list(self.consumed), self.due)
        for reader, batch, skipped in super().__iter__():
            self.skipped_now[reader] = skipped  # counted from the epoch's start, so the same after resuming
            self.due = (reader + 1) % self.readers  # the DataLoader's round robin: exhausted readers drop out
            if batch is not None:  # None: the reader's last report of what it skipped
                self.consumed[reader] += 1
                yield batch
        self.epoch, self.consumed, self.due = self.epoch + 1, [0] * self.readers, 0
        self.skipped_before, self.skipped_now = self.skipped, [0] * self.readers

    def forever(self) -> Iterator[dict[str, Tensor]]:
        """Batches epoch after epoch, without end: for training by steps (``batches = loader.forever()``,
        then ``next(batches)`` each step), where ranks must take the same number of steps whatever their
        epochs hold. The position stays exact; ``state_dict`` saves it as ever."""
        while True:
            fresh, count = not any(self.consumed), 0
            for batch in self:
                count += 1
                yield batch
            if fresh and not count:
                raise RuntimeError(f"rank {self.dataset.rank} got no batch in a whole epoch: its shards hold no rows")

    def state_dict(self) -> dict:
        """The position: ``epoch``, ``batches`` handed out per reader in it, the reader ``due`` next, what
        must match to resume, and how much was ``skipped`` (in all; and per reader in this epoch)."""
        stream = self.dataset
        return {
            "epoch": self.epoch,
            "batches": list(self.consumed),
            "due": self.due,
            "num_workers": self.num_workers,
            "rank": stream.rank,
            "world_size": stream.world_size,
            "seed": stream.seed,
            "batch_size": stream.batch_size,
            "num_shards": len(stream.shards),
            "pack": stream.pack,
            "skipped": self.skipped,
            "skipped_this_epoch": list(self.skipped_now),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by ``state_dict`` (of a loader built with the same arguments)."""
        mine = self.state_dict()
        for name in ("num_workers", "rank", "world_size", "seed", "batch_size", "num_shards", "pack"):
            if state.get(name) != mine[name]:
                raise ValueError(
                    f"the saved position has {name}={state.get(name)!r} but this loader has {mine[name]!r}"
                )
        batches, epoch, due = state.get("batches"), state.get("epoch"), state.get("due")
        valid = isinstance(batches, list) and len(batches) == self.readers and isinstance(epoch, int)
        if not valid or not (isinstance(due, int) and 0 <= due < self.readers):
            raise ValueError(
                f"the saved position needs an int epoch, {self.readers} batch counts and due, got {state!r}"
            )
        skipped, now = state.get("skipped", 0), state.get("skipped_this_epoch", [0] * self.readers)
        if not isinstance(skipped, int) or not isinstance(now, list) or len(now) != self.readers:
            raise ValueError(f"the saved position needs an int skipped and {self.readers} skipped_this_epoch counts")
        self.epoch, self.consumed, self.due = epoch, [int(count) for count in batches], due
        self.skipped_before, self.skipped_now = skipped - sum(now), [int(count) for count in now]


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """A brace pattern or a list of shards -> the list of shards."""
    if isinstance(shards, str):
        import braceexpand

        shards = list(braceexpand.braceexpand(shards))
    shards = list(shards)
    if not shards or not all(isinstance(shard, str) for shard in shards):
        raise ValueError(f"shards must be a non-empty list of paths or URLs, or a brace pattern, got {shards!r}")
    return shards


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): as given, else from ``torch.distributed`` when it runs, else (0, 1)."""
    running = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if running else 0)
    world_size = world_size if world_size is not None else (dist.get_world_size() if running else 1)
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}"
        )
    return rank, world_size
