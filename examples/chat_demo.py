"""Chat with a Flamingo in the browser: images and text in, the reply streamed token by token.

    python examples/train_shapes.py        # once: writes out/flamingo_shapes.safetensors
    python examples/chat_demo.py           # then open http://127.0.0.1:8000

    # OpenFlamingo's released weights (transformers, open_clip and the downloads they make):
    python examples/chat_demo.py --openflamingo checkpoint.pt \
        --lm anas-awadalla/mpt-1b-redpajama-200b --clip ViT-L-14 --clip-pretrained openai --trust-remote-code
    # what Flamingo.save_trained wrote, with the language model and encoder it was trained on:
    python examples/chat_demo.py --flamingo trained.safetensors --lm NAME --encoder NAME   # or open_clip:NAME

Needs ``pip install -e ".[chat]"`` (and ``".[hf,clip]"`` for the last two). The shapes model knows
only its task's words: ask ``what color ?``, ``what shape ?``, ``what size ?`` or ``what corner ?``
about an image (at most 4 images per conversation). The server and the page are
``flamingo_pytorch/chat_server.py`` and ``chat_page.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shapes demo's modules sit next to this file

from flamingo_pytorch.chat_server import ChatModel, make_server, pil_to_tensor

DEFAULT_CHECKPOINT = Path("out/flamingo_shapes.safetensors")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="a train_shapes.py checkpoint")
    parser.add_argument("--openflamingo", type=Path, help="an OpenFlamingo checkpoint.pt (with --lm and --clip)")
    parser.add_argument("--flamingo", type=Path, help="a save_trained file (with --lm and --encoder)")
    parser.add_argument("--lm", help="the transformers language model (name or folder)")
    parser.add_argument("--clip", help="the open_clip architecture, e.g. ViT-L-14")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip's pretrained tag or a local file")
    parser.add_argument("--encoder", help="a transformers vision model (name or folder), or open_clip:ARCH")
    parser.add_argument(
        "--max-images", type=int, default=5, help="images per conversation where the model sets no limit (OpenFlamingo)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="passed to transformers (MPT)")
    args = parser.parse_args(argv)
    if args.openflamingo is not None and args.flamingo is not None:
        parser.error("give --openflamingo or --flamingo, not both")
    if args.openflamingo is not None and (args.lm is None or args.clip is None):
        parser.error("--openflamingo needs --lm (the language model) and --clip (the open_clip architecture)")
    if args.flamingo is not None and (args.lm is None or args.encoder is None):
        parser.error("--flamingo needs --lm (the language model) and --encoder (the vision encoder)")
    for name in ("openflamingo", "flamingo"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"--{name} {path}: no such file")
    return args


def shapes_chat_model(checkpoint: Path, device: torch.device) -> ChatModel:
    """The shapes demo's model (FlamingoPaLM, or its Llama variant) and word tokenizer."""
    from shapes_dataset import IMAGE_SIZE, make_tokenizer
    from train_shapes import load_checkpoint

    model, _, _ = load_checkpoint(checkpoint, device)
    tokenizer = make_tokenizer()
    return ChatModel(
        model=model.eval(),
        encode=tokenizer.encode,
        decode=tokenizer.decode,
        image_tensor=lambda image: pil_to_tensor(image, IMAGE_SIZE),  # [0, 1], as shapes_dataset renders them
        image_token="<image>",
        eos_token_id=tokenizer.ids["."],  # every answer ends with " ."
        max_images=model.perceiver_resampler.num_time_embeds,
        pad_token_id=tokenizer.pad_id,
        device=device,
    )


def hf_chat_model(model, tokenizer, image_transform, *, eos_token_id: int, max_images: int | None) -> ChatModel:
    """A ``Flamingo`` over a transformers language model, with its tokenizer (``<image>`` added)."""
    device = next(model.parameters()).device
    limit = model.perceiver_resampler.num_time_embeds
    return ChatModel(
        model=model.eval(),
        encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        image_tensor=image_transform,
        image_token="<image>",
        eos_token_id=eos_token_id,
        max_images=limit if limit is not None else max_images,
        prefix_ids=tokenizer("")["input_ids"],  # what the tokenizer puts first (a BOS token, or nothing)
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        device=device,
    )


def openflamingo_chat_model(args: argparse.Namespace) -> ChatModel:
    """``--openflamingo``: load the language model and open_clip encoder by name, then ``openflamingo_chat``."""
    import open_clip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    clip, _, transform = open_clip.create_model_and_transforms(args.clip, pretrained=args.clip_pretrained)
    tokenizer = AutoTokenizer.from_pretrained(args.lm, trust_remote_code=args.trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(args.lm, trust_remote_code=args.trust_remote_code)
    chat = openflamingo_chat(args.openflamingo, lm, tokenizer, clip, transform, max_images=args.max_images)
    chat.model.to(args.device)
    chat.device = torch.device(args.device)
    return chat


def openflamingo_chat(checkpoint, lm, tokenizer, clip, transform, *, max_images: int | None) -> ChatModel:
    """OpenFlamingo's checkpoint over the language model (its tokenizer) and open_clip model it was trained with.

    Replies end at ``<|endofchunk|>``, as OpenFlamingo's answers do.
    """
    from flamingo_pytorch.openflamingo import add_openflamingo_tokens, load_openflamingo

    image_id, end_of_chunk_id = add_openflamingo_tokens(tokenizer, lm)
    model = load_openflamingo(checkpoint, lm, media_token_id=image_id, vision_encoder=clip)
    return hf_chat_model(model, tokenizer, transform, eos_token_id=end_of_chunk_id, max_images=max_images)


def saved_flamingo_chat_model(args: argparse.Namespace) -> ChatModel:
    """``--flamingo``: load the language model and vision encoder by name, then ``saved_flamingo_chat``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.lm, trust_remote_code=args.trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(args.lm, trust_remote_code=args.trust_remote_code)
    from flamingo_pytorch.vision import load_vision_encoder

    encoder, transform = load_vision_encoder(args.encoder, args.clip_pretrained)
    chat = saved_flamingo_chat(args.flamingo, lm, tokenizer, encoder, transform, max_images=args.max_images)
    chat.model.to(args.device)
    chat.device = torch.device(args.device)
    return chat


def saved_flamingo_chat(path: Path, lm, tokenizer, encoder, transform, *, max_images: int | None) -> ChatModel:
    """A ``save_trained`` file over the language model (its tokenizer) and vision encoder it was trained on.

    ``<image>`` and ``<|endofchunk|>`` are added to the tokenizer if it lacks them; replies end at ``<|endofchunk|>``.
    """
    from flamingo_pytorch.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, add_flamingo_tokens
    from flamingo_pytorch.trained_weights import flamingo_from_layout, saved_layout

    layout = saved_layout(path)
    if layout is None:
        raise SystemExit(f"{path} was not written by save_trained (for OpenFlamingo's, use --openflamingo)")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        add_flamingo_tokens(tokenizer, lm)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != layout["media_token_id"]:
        raise SystemExit(
            f"{path} was trained with {IMAGE_TOKEN} = id {layout['media_token_id']}; the tokenizer has {image_id}"
        )
    model = flamingo_from_layout(layout, path, lm, encoder)
    end_of_chunk_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
    return hf_chat_model(model, tokenizer, transform, eos_token_id=end_of_chunk_id, max_images=max_images)


def build_chat_model(args: argparse.Namespace) -> ChatModel:
    device = torch.device(args.device)
    if args.openflamingo is not None:
        return openflamingo_chat_model(args)
    if args.flamingo is not None:
        return saved_flamingo_chat_model(args)
    if not args.checkpoint.is_file():
        raise SystemExit(
            f"no checkpoint at {args.checkpoint}: train the shapes model first with\n"
            "    python examples/train_shapes.py\n"
            "(1 to 2 minutes on a CPU; it writes out/flamingo_shapes.safetensors), or pass --checkpoint PATH"
        )
    return shapes_chat_model(args.checkpoint, device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chat = build_chat_model(args)
    server = make_server(chat, args.host, args.port)
    print(f"serving the chat on http://{args.host}:{server.server_port} (Ctrl+C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
