"""``flamingo`` for lmms-eval: its ``generate_until`` and ``loglikelihood`` requests, answered by ``EvalModel``.

Images in the context (lmms-eval's convention, as its built-in models read it): a context that holds
``<image>`` tokens holds one per visual, in order; a context with numbered placeholders
(``<image 1>``, ``<image 2>``, as MMMU writes them) gets each replaced by ``<image>`` and the
visuals reordered to match (a visual named twice is passed twice); a context with neither gets one
``<image>`` per visual prepended. Flamingo then reads exactly one image per ``<image>`` token.

Log-likelihoods are ``EvalModel``'s class scores summed over the continuation's tokens instead of
averaged (lmms-eval's metrics take the sum, and ``acc_norm`` divides it by the length itself); the
continuation is tokenized alone, as OpenFlamingo scores class names, and a context's continuations
are scored from one pass over the context.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import torch
from torch import Tensor

try:
    from lmms_eval.api.model import lmms
except ModuleNotFoundError as error:  # imported only by lmms-eval or by a user of the plugin
    raise ImportError('the lmms-eval plugin needs lmms-eval: pip install "flamingo-pytorch[eval]"') from error
try:  # lmms-eval 0.7 turns any model output but a str or a GenerationResult into its str
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # older versions pass the (log-probability, greedy) pairs through as they are
    GenerationResult = None

from flamingo_pytorch.evaluation.models import EvalModel
from flamingo_pytorch.evaluation.prompts import IMAGE

NUMBERED_IMAGE = re.compile(r"<image (\d+)>")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def place_images(context: str, visuals: Sequence) -> tuple[str, list]:
    """(context, visuals) -> (text with one ``<image>`` per image, the images in that order)."""
    if not visuals:
        raise ValueError("a request without images: the flamingo model answers requests with at least one image")
    numbered = [int(n) for n in NUMBERED_IMAGE.findall(context)]
    if numbered:
        if not all(1 <= n <= len(visuals) for n in numbered):
            raise ValueError(f"the context names images {numbered}, but the request has {len(visuals)} visuals")
        return NUMBERED_IMAGE.sub(IMAGE, context), [visuals[n - 1] for n in numbered]
    count = context.count(IMAGE)
    if count == 0:
        return IMAGE * len(visuals) + context, list(visuals)
    if count != len(visuals):
        raise ValueError(f"the context holds {count} {IMAGE} tokens but the request has {len(visuals)} visuals")
    return context, list(visuals)


def log_probability_and_greedy(logits: Tensor, tokens: Tensor) -> Tensor:
    """logits (b, L, v) predicting tokens (b, L) -> (b, 2): the tokens' summed log-probability, and
    1.0 where every token is the most likely one (greedy decoding would produce them), else 0.0."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    total = log_probs.gather(2, tokens[:, :, None]).squeeze(-1).sum(dim=1)  # (b,)
    greedy = (logits.argmax(dim=-1) == tokens).all(dim=1)  # (b,)
    return torch.stack((total, greedy.float()), dim=1)


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings ``until`` (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class FlamingoLMMs(lmms):
    """A Flamingo as an lmms-eval model (``--model flamingo``).

    Args:
        checkpoint: ``save_trained``'s safetensors file (the model is rebuilt from the layout it
            records), or an OpenFlamingo ``checkpoint.pt`` (``load_openflamingo``).
        lm: the language model: a local folder written with ``save_pretrained``, or a hub name.
        vision: the vision encoder: a transformers folder or name (its image processor is read from
            the same place), or ``open_clip:<architecture>`` (e.g. ``open_clip:ViT-L-14``, with
            ``vision_pretrained=openai``, OpenFlamingo's).
        tokenizer: where the tokenizer is (default: ``lm``). Without ``<image>`` and
            ``<|endofchunk|>`` they are added (``add_flamingo_tokens``, or ``add_openflamingo_tokens``
            for an OpenFlamingo checkpoint) and the embeddings resized.
        vision_pretrained: open_clip's ``pretrained`` (a tag or a local file).
        device: where the model runs (default: cuda if available, else cpu).
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the language model and encoder.
        batch_size: prompts per call (lmms-eval's ``--batch_size``).
        max_new_tokens: the default when a task's ``generation_kwargs`` name none.
        trust_remote_code: passed to transformers when loading ``lm`` and ``tokenizer`` (e.g. MPT).
        model: an ``EvalModel`` to use instead of loading one (for use from Python).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        lm: str | None = None,
        vision: str | None = None,
        tokenizer: str | None = None,
        vision_pretrained: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 128,
        trust_remote_code: bool = False,
        model: EvalModel | None = None,
    ):
        super().__init__()
        if model is None:
            if checkpoint is None or lm is None:
                raise ValueError(f"model_args need checkpoint= and lm= (got checkpoint={checkpoint}, lm={lm})")
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            sources = (str(checkpoint), str(lm), vision, tokenizer, vision_pretrained)
            model = load_eval_model(*sources, device, dtype, trust_remote_code=bool(trust_remote_code))
        elif not isinstance(model, EvalModel):
            raise TypeError(f"model must be an EvalModel, got {type(model).__name__}")
        self.model = model
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    # -- requests ----------------------------------------------------------------------------------

    def visuals_of(self, doc_to_visual, doc_id: int, task: str, split: str) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [visual for visual in visuals or [] if visual is not None]

    def generate_until(self, requests) -> list[str]:
        """Each request's continuation (args: context, generation_kwargs, doc_to_visual, doc_id, task,
        split), greedy (or beam search with ``num_beams``), cut at ``until`` and ``<|endofchunk|>``."""
        prompts = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            text, images = place_images(context, self.visuals_of(doc_to_visual, doc_id, task, split))
            prompts.append((text, images, dict(gen_kwargs or {})))
        results: list[str] = [""] * len(prompts)
        groups: dict[str, list[int]] = {}  # same generation settings, batched together
        for i, (_, _, gen_kwargs) in enumerate(prompts):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, text in zip(chunk, self.generate_batch([prompts[i] for i in chunk])):
                    results[i] = text
        return results

    def generate_batch(self, prompts: list[tuple[str, list, dict]]) -> list[str]:
        gen_kwargs = prompts[0][2]
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        outputs = self.model.generate(
            [text for text, _, _ in prompts],
            [images for _, images, _ in prompts],
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            num_beams=int(gen_kwargs.get("num_beams") or 1),
            length_penalty=float(gen_kwargs.get("length_penalty", 1.0)),
        )
        return [cut_at(text, until) for text in outputs]

    def loglikelihood(self, requests) -> list:
        """(log-probability of the continuation, whether greedy decoding gives it) per request (args:
        context, continuation, doc_to_visual, doc_id, task, split); one pass per context. Each pair
        is wrapped in lmms-eval's ``GenerationResult`` where it has one (0.7: its evaluator turns a
        bare tuple into a string, and multiple-choice scoring then fails)."""
        groups: dict[tuple, list[int]] = {}  # the requests of one context: its continuations
        for i, request in enumerate(requests):
            if len(request.args) != 6:
                raise ValueError("requests without visuals (acc_mutual_info's unconditional scores) are not supported")
            context, _, _, doc_id, task, split = request.args
            groups.setdefault((context, doc_id, task, split), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for (context, doc_id, task, split), indices in groups.items():
            doc_to_visual = requests[indices[0]].args[2]
            text, images = place_images(context, self.visuals_of(doc_to_visual, doc_id, task, split))
            continuations = [self.continuation(requests[i].args[1], doc_id, task, split) for i in indices]
            scores = self.model.class_log_likelihoods([text], [images], continuations, log_probability_and_greedy)
            for i, (total, greedy) in zip(indices, scores[0].tolist()):  # scores (1, C, 2)
                results[i] = (total, bool(greedy))
        return results if GenerationResult is None else [GenerationResult(text=pair) for pair in results]

    def continuation(self, target, doc_id: int, task: str, split: str) -> str:
        return target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the flamingo model answers generate_until and loglikelihood requests")


def load_eval_model(
    checkpoint: str, lm: str, vision: str | None, tokenizer: str | None, vision_pretrained: str | None,
    device: str, dtype: str, *, trust_remote_code: bool = False,
) -> EvalModel:  # fmt: skip
    """The ``FlamingoLMMs`` arguments -> an ``EvalModel`` holding the loaded Flamingo."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flamingo_pytorch.openflamingo import add_openflamingo_tokens, load_openflamingo
    from flamingo_pytorch.tokens import add_flamingo_tokens
    from flamingo_pytorch.trained_weights import flamingo_from_layout, saved_layout
    from flamingo_pytorch.vision import load_vision_encoder

    layout = saved_layout(checkpoint)
    text = AutoTokenizer.from_pretrained(tokenizer or lm, trust_remote_code=trust_remote_code)
    language_model = AutoModelForCausalLM.from_pretrained(lm, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    encoder, transform = load_vision_encoder(vision, vision_pretrained) if vision is not None else (None, None)
    if encoder is None:
        raise ValueError("vision= is needed: the vision encoder the checkpoint was trained with")
    encoder = encoder.to(DTYPES[dtype])
    if IMAGE not in text.get_vocab():
        (add_openflamingo_tokens if layout is None else add_flamingo_tokens)(text, language_model)
    if layout is None:
        model = load_openflamingo(
            checkpoint, language_model, media_token_id=text.convert_tokens_to_ids(IMAGE), vision_encoder=encoder
        )
    else:
        model = flamingo_from_layout(layout, checkpoint, language_model, encoder)
    return EvalModel(model.to(device), text, transform, device=torch.device(device))
