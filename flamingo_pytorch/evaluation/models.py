"""What the evaluation asks of a model: captions and answers by generation, class scores by likelihood.

``EvalModel`` wraps a ``Flamingo`` (over a transformers language model) or a ``FlamingoPaLM`` with
its tokenizer and image transform, and talks to them only through their public methods. It
batches as OpenFlamingo's evaluation does: prompts tokenized together, left-padded (longest, at
most 2,000 tokens), with their ``attention_mask``; each row's images stacked in order and padded
with zero images that ``time_mask`` marks False.

Class scores (rank classification): the log-likelihood of each class name's tokens after the
prompt, averaged over its tokens (OpenFlamingo's ``normalize_length=True``). The prompt runs once
per batch, not once per class:

- ``Flamingo``: the prompt's media are resampled once and held by ``Flamingo.media`` while the
  language model runs the prompt with its key/value cache; each class name then runs from that
  cache (its first token's score comes from the prompt's last logits), and the cache is cropped
  back to the prompt after it. Cost per class: one forward over the class name's tokens but one.
- ``FlamingoPaLM``: ``prefill`` runs the prompt once; each class name extends a copy of that
  state token by token (copying the cache costs memory traffic, not model compute).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from flamingo_pytorch.evaluation.datasets import load_image
from flamingo_pytorch.evaluation.prompts import END_OF_CHUNK, IMAGE
from flamingo_pytorch.language_model import cache_keyword, cache_of

MAX_PROMPT_TOKENS = 2000  # OpenFlamingo's truncation length
WITHHOLD = ("blank", "none")  # controls: zero images in place of the real ones, or no images at all


def as_image(image):
    return load_image(image) if isinstance(image, str) else image


class EvalModel:
    """A Flamingo with its tokenizer and image transform, as the evaluation harness calls it.

    Args:
        model: a ``Flamingo`` or a ``FlamingoPaLM``, already holding its weights.
        tokenizer: a transformers tokenizer that knows ``<image>`` and ``<|endofchunk|>``.
        image_transform: PIL image -> (c, H, W) float tensor (e.g. open_clip's preprocess).
        device: where inputs go (default: the model's parameters' device).
        end_of_chunk: the token that ends an answer: generation stops there and the text is cut
            before it (default OpenFlamingo's ``<|endofchunk|>``; e.g. ``"."`` for a model trained on
            answers ending in a full stop, with a matching ``PromptTemplate``).
        withhold_images: a control that keeps the images from the model, the prompts unchanged:
            ``"blank"`` passes zero images (same shapes and ``time_mask``), ``"none"`` passes no
            images at all (the ``<image>`` tokens stay in the text; nothing is cross-attended).
            None (default): the images are passed. (RICES still reads them to pick demonstrations.)
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_transform: Callable,
        device: torch.device | None = None,
        *,
        end_of_chunk: str = END_OF_CHUNK,
        withhold_images: str | None = None,
    ):
        from flamingo_pytorch.flamingo import Flamingo
        from flamingo_pytorch.flamingo_palm import FlamingoPaLM

        if not isinstance(model, (Flamingo, FlamingoPaLM)):
            raise TypeError(f"model must be a Flamingo or a FlamingoPaLM, got {type(model).__name__}")
        if withhold_images not in (None, *WITHHOLD):
            raise ValueError(f"withhold_images must be None, 'blank' or 'none', got {withhold_images!r}")
        self.withhold_images = withhold_images
        self.model, self.tokenizer, self.image_transform = model.eval(), tokenizer, image_transform
        self.is_palm = isinstance(model, FlamingoPaLM)
        self.device = device if device is not None else next(model.parameters()).device
        self.tokenizer.padding_side = "left"
        vocabulary = tokenizer.get_vocab()
        for token in (IMAGE, end_of_chunk):
            if token not in vocabulary:
                raise ValueError(
                    f"tokenizer has no {token} token: add it (add_openflamingo_tokens or add_flamingo_tokens)"
                )
        if vocabulary[IMAGE] != model.media_token_id:
            raise ValueError(
                f"the tokenizer's {IMAGE} is id {vocabulary[IMAGE]} "
                f"but the model's media_token_id is {model.media_token_id}"
            )
        self.end_of_chunk_id = vocabulary[end_of_chunk]

    # -- inputs ------------------------------------------------------------------------------------

    def prepare_images(self, batch_images: Sequence[Sequence]) -> tuple[Tensor | None, Tensor | None]:
        """Lists of images (paths or PIL) -> images (b, t, c, H, W) and time_mask (b, t), zero-padded;
        with ``withhold_images``: the images zeroed ("blank"), or (None, None) ("none")."""
        if self.withhold_images == "none":
            return None, None
        pixels = [[self.image_transform(as_image(image)) for image in row] for row in batch_images]
        shape = next(tensor.shape for row in pixels for tensor in row)
        count = max(len(row) for row in pixels)
        images = torch.zeros(len(pixels), count, *shape)  # (b, t, c, H, W)
        time_mask = torch.zeros(len(pixels), count, dtype=torch.bool)  # (b, t)
        for i, row in enumerate(pixels):
            for j, tensor in enumerate(row):
                images[i, j], time_mask[i, j] = tensor, True
        if self.withhold_images == "blank":
            images.zero_()
        return images.to(self.device), time_mask.to(self.device)

    def prepare_text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> input_ids (b, n) and attention_mask (b, n) bool, left-padded to the longest."""
        encoded = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].bool().to(self.device)

    # -- generation --------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        texts: Sequence[str],
        batch_images: Sequence[Sequence],
        *,
        min_new_tokens: int = 0,
        max_new_tokens: int = 20,
        num_beams: int = 3,
        length_penalty: float = 0.0,
    ) -> list[str]:
        """Each prompt's continuation, decoded without special tokens, stopping at ``<|endofchunk|>``.

        ``Flamingo``: the language model's beam search (OpenFlamingo's settings). ``FlamingoPaLM``
        has no beam search: it decodes greedily (``num_beams``, ``min_new_tokens`` and
        ``length_penalty`` then do not apply).
        """
        input_ids, attention_mask = self.prepare_text(texts)
        images, time_mask = self.prepare_images(batch_images)
        if self.is_palm:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            out = self.model.generate(
                input_ids, images, time_mask=time_mask, attention_mask=attention_mask,
                max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=self.end_of_chunk_id, pad_token_id=pad,
            )  # fmt: skip
        else:
            out = self.model.generate(
                input_ids, images, time_mask=time_mask, attention_mask=attention_mask,
                min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens, num_beams=num_beams,
                length_penalty=length_penalty, eos_token_id=self.end_of_chunk_id,
            )  # fmt: skip
        return self.tokenizer.batch_decode(
            [until_end(row, self.end_of_chunk_id) for row in out[:, input_ids.shape[1] :].tolist()],
            skip_special_tokens=True,
        )

    # -- rank classification -----------------------------------------------------------------------

    def class_tokens(self, class_names: Sequence[str]) -> list[Tensor]:
        """Each class name's token ids (1, L), tokenized alone, without special tokens."""
        return [
            self.tokenizer(name, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
            for name in class_names
        ]

    @torch.inference_mode()
    def class_log_likelihoods(
        self,
        texts: Sequence[str],
        batch_images: Sequence[Sequence],
        class_names: Sequence[str],
        score: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """(b, C) float: each class name's mean token log-probability after each prompt.

        ``score`` maps a class name's logits (b, L, v) and tokens (b, L) to its score (b, ...)
        instead (default ``mean_log_probability``); the result is then (b, C, ...).
        """
        input_ids, attention_mask = self.prepare_text(texts)
        images, time_mask = self.prepare_images(batch_images)
        tokens = self.class_tokens(class_names)
        score = mean_log_probability if score is None else score
        if self.is_palm:
            scores = self.palm_scores(input_ids, attention_mask, images, time_mask, tokens, score)
        else:
            scores = self.cached_scores(input_ids, attention_mask, images, time_mask, tokens, score)
        return torch.stack(scores, dim=1).float().cpu()  # (b, C, ...)

    def cached_scores(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Tensor,
        time_mask: Tensor,
        tokens: list[Tensor],
        score: Callable[[Tensor, Tensor], Tensor],
    ) -> list[Tensor]:
        model, b = self.model, input_ids.shape[0]
        media = model.encode_media(input_ids, images, image_embeds=None, time_mask=time_mask)  # (b, t, m, e)
        scores = []
        with model.media(media, time_mask):
            prompt = model.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
            cache = cache_of(prompt)
            last = prompt.logits[:, -1:]  # (b, 1, v)
            if not hasattr(cache, "crop"):  # a cache that cannot be cut back: the whole prompt per class
                return self.uncached_scores(input_ids, attention_mask, images, time_mask, tokens, score)
            keyword = cache_keyword(model.lm)
            for name in tokens:
                name = name.expand(b, -1)  # (b, L)
                logits = last
                if name.shape[1] > 1:
                    mask = torch.cat((attention_mask, torch.ones_like(name[:, :-1], dtype=torch.bool)), dim=1)
                    rest = model.lm(input_ids=name[:, :-1], attention_mask=mask, use_cache=True, **{keyword: cache})
                    logits = torch.cat((last, rest.logits), dim=1)  # (b, L, v)
                    cache.crop(-(name.shape[1] - 1))  # back to the prompt (negative: tokens to drop)
                scores.append(score(logits, name))
        return scores

    def uncached_scores(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Tensor,
        time_mask: Tensor,
        tokens: list[Tensor],
        score: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> list[Tensor]:
        """The reference: prompt and class name through ``forward`` together, once per class."""
        score = mean_log_probability if score is None else score
        scores = []
        for name in tokens:
            name = name.expand(input_ids.shape[0], -1)  # (b, L)
            text = torch.cat((input_ids, name), dim=1)  # (b, n + L)
            mask = torch.cat((attention_mask, torch.ones_like(name, dtype=torch.bool)), dim=1)
            logits = self.model(text, images, time_mask=time_mask, attention_mask=mask).logits
            scores.append(score(logits[:, -name.shape[1] - 1 : -1], name))
        return scores

    def palm_scores(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Tensor,
        time_mask: Tensor,
        tokens: list[Tensor],
        score: Callable[[Tensor, Tensor], Tensor],
    ) -> list[Tensor]:
        state = self.model.prefill(input_ids, images, time_mask=time_mask, attention_mask=attention_mask)
        scores = []
        for name in tokens:
            name = name.expand(input_ids.shape[0], -1)  # (b, L)
            logits, branch = [state.logits], None
            for i in range(name.shape[1] - 1):
                if branch is None:
                    with torch.inference_mode():
                        branch = copy.deepcopy(state)
                branch = self.model.extend(branch, name[:, i : i + 1])
                logits.append(branch.logits)
            scores.append(score(torch.stack(logits, dim=1), name))  # logits (b, L, v)
        return scores

    # -- RICES -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def vision_features(self, images: Sequence) -> Tensor:
        """(b, e): the model's own vision encoder's features of each image, averaged over patches."""
        encoder = self.model.img_encoder if self.is_palm else self.model.vision_encoder
        if encoder is None:
            raise ValueError("RICES needs the model's vision encoder, and this model was built without one")
        pixels = torch.stack([self.image_transform(as_image(image)) for image in images]).to(self.device)
        features = encoder(pixels)  # (b, p, e) or (b, e)
        return features.mean(dim=1) if features.ndim == 3 else features


def until_end(tokens: list[int], end_id: int) -> list[int]:
    """The generated tokens before the first ``end_id`` (all of them if it never comes)."""
    return tokens[: tokens.index(end_id)] if end_id in tokens else tokens


def mean_log_probability(logits: Tensor, tokens: Tensor) -> Tensor:
    """logits (b, L, v) predicting tokens (b, L) -> (b,) mean log-probability of the tokens."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(2, tokens[:, :, None]).squeeze(-1).mean(dim=1)
