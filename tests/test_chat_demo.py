"""The chat demo's server (flamingo_pytorch/chat_server.py), in process over HTTP, on a tiny random shapes model.

Its replies are the model's own: the tokens streamed for a turn equal greedy ``prefill`` +
``generate_from`` (and ``extend`` for the next turn) on the same weights. Bad uploads, too many
images and unknown words are 4xx JSON messages; turns never run on the model at once.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("safetensors")

from conftest import open_gates
from PIL import Image

from flamingo_pytorch import chat_server
from flamingo_pytorch.chat_server import make_server, read_turn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from chat_demo import shapes_chat_model  # noqa: E402
from shapes_dataset import make_labelled_images, make_tokenizer  # noqa: E402
from shapes_encoder import ShapesEncoder  # noqa: E402
from train_shapes import build_model, model_config, save_checkpoint  # noqa: E402

MAX_NEW_TOKENS = 5


def tiny_shapes_checkpoint(path: Path, lm: str = "palm") -> Path:
    """The demo's shapes model (``lm``: "palm" or "llama", as ``train_shapes.py --lm``), random weights and
    open gates (so images matter), saved as train_shapes saves it."""
    torch.manual_seed(0)
    config = model_config(make_tokenizer())
    if lm == "llama":
        from shapes_hf import ShapesFlamingo, build_llama

        config["lm"] = "llama"
        model = ShapesFlamingo(build_llama(config), ShapesEncoder(dim=config["dim"]), config)
    else:
        model = build_model(config, ShapesEncoder(dim=config["dim"]))
    open_gates(model, 0.5)
    save_checkpoint(path, model, config, {})
    return path


def png_base64(pixels: torch.Tensor) -> str:
    """(3, H, W) floats in [0, 1] -> a PNG as base64."""
    buffer = io.BytesIO()
    Image.fromarray((pixels.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_from_base64(data: str) -> torch.Tensor:
    """What the model should see: the PNG decoded, (3, H, W) in [0, 1] (the images are already the model's size)."""
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (H, W, 3) -> (3, H, W)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_shapes_checkpoint(tmp_path_factory.mktemp("chat") / "shapes.safetensors")


@pytest.fixture(scope="module")
def images() -> list[str]:
    pixels, _ = make_labelled_images(6, torch.Generator().manual_seed(1))
    return [png_base64(image) for image in pixels]


@pytest.fixture
def served(checkpoint):
    chat = shapes_chat_model(checkpoint, torch.device("cpu"))
    server = make_server(chat, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield chat, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def post(url: str, body: dict) -> tuple[int, list[dict]]:
    """POST JSON -> (status, the NDJSON lines or the one JSON object of an error)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, [json.loads(line) for line in response if line.strip()]
    except urllib.error.HTTPError as error:
        return error.code, [json.loads(error.read())]


def turn(url: str, session: str, image: str | None, text: str, **settings) -> tuple[int, list[dict]]:
    parts = ([{"type": "image", "data": image}] if image is not None else []) + [{"type": "text", "text": text}]
    settings = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, **settings}
    return post(url + "/api/chat", {"session": session, "parts": parts, "settings": settings})


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def greedy(chat, state) -> list[int]:
    new = chat.model.generate_from(
        state, max_new_tokens=MAX_NEW_TOKENS, temperature=0, eos_token_id=chat.eos_token_id, pad_token_id=0
    )
    return until_eos(new[0].tolist(), chat.eos_token_id)


def streamed_tokens(lines: list[dict]) -> list[int]:
    *steps, done = lines
    assert done["done"] and [line["token"] for line in steps] == done["tokens"]
    assert "".join(line["text"] for line in steps) == done["reply"] == steps[-1]["reply"]
    return done["tokens"]


def test_two_turns_stream_the_models_own_greedy_replies(served, images):
    chat, url = served
    status, first = turn(url, "a", images[0], "what color ?")
    assert status == 200
    status, second = turn(url, "a", images[1], "what shape ?")
    assert status == 200

    tokenizer = make_tokenizer()
    state = chat.model.prefill(
        torch.tensor([tokenizer.encode("<image> what color ?")]), image_from_base64(images[0])[None, None]
    )
    assert streamed_tokens(first) == greedy(chat, state)
    chat.model.extend(
        state, torch.tensor([tokenizer.encode("<image> what shape ?")]), image_from_base64(images[1])[None, None]
    )
    assert streamed_tokens(second) == greedy(chat, state)


def test_the_image_changes_the_reply_logits(served, images):
    """The open gates let the image through: two images give two different next-token distributions."""
    chat, _ = served
    text = torch.tensor([make_tokenizer().encode("<image> what color ?")])
    logits = [chat.model.prefill(text, image_from_base64(image)[None, None]).logits for image in images[:2]]
    assert not torch.allclose(*logits)


def test_parts_keep_their_order():
    prompt, pictures = read_turn(
        [
            {"type": "text", "text": "what"},
            {"type": "image", "data": "data:image/png;base64," + png_base64(torch.zeros(3, 4, 4))},
            {"type": "text", "text": "color ?"},
        ],
        "<image>",
    )
    assert prompt == "what <image> color ?" and len(pictures) == 1 and pictures[0].size == (4, 4)


def test_the_streamer_waits_for_a_character_cut_between_tokens():
    """Byte-level tokens: "é" is two tokens; nothing is shown until both have come."""
    from flamingo_pytorch.chat_server import ChatModel, TokenStreamer

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    chat = ChatModel(None, None, decode, None, "<image>", eos_token_id=ord("."), max_images=None)
    seen = []
    streamer = TokenStreamer(chat, lambda: seen.append("start"), lambda *line: seen.append(line))
    streamer.put(torch.tensor([[1, 2, 3]]))  # the conversation so far
    for token in [*b"caf", *"é".encode(), ord("."), ord("!")]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    pieces = [(text, reply) for _, text, reply in seen[1:]]
    assert seen[0] == "start" and len(pieces) == 6  # nothing after the end of the reply (".")
    assert pieces[3:] == [("", "caf"), ("é", "café"), (".", "café.")]


def error_of(result: tuple[int, list[dict]]) -> tuple[int, str]:
    status, lines = result
    (body,) = lines
    assert "Traceback" not in body["error"]
    return status, body["error"]


def test_bad_uploads_are_refused_with_a_message(served, images, monkeypatch):
    _, url = served
    text_file = base64.b64encode(b"just some text, not a picture").decode()
    assert error_of(turn(url, "b", text_file, "what color ?")) == (
        400,
        "image 1 is not an image that can be read (PNG, JPEG, GIF, WebP, ...)",
    )
    wide = png_base64(torch.zeros(3, 1, chat_server.MAX_IMAGE_SIDE + 1))
    status, message = error_of(turn(url, "b", wide, "what color ?"))
    assert status == 413 and message == "image 1 is 4097x1 pixels; the limit is 4096x4096"
    status, message = error_of(turn(url, "b", images[0], "what colour ?"))
    assert status == 400 and message == "text has words outside the vocabulary: ['colour']"
    monkeypatch.setattr(chat_server, "MAX_IMAGE_BYTES", 100)
    status, message = error_of(turn(url, "b", png_base64(torch.rand(3, 16, 16)), "what color ?"))
    assert status == 413 and message == "image 1 is over the limit of 100 bytes"


def test_settings_are_checked_and_sampling_runs(served, images):
    _, url = served
    refused = {
        "max new tokens must be a whole number from 1 to 512": dict(max_new_tokens=0),
        "temperature must be a number >= 0 (0 is greedy)": dict(temperature=-1),
        "top-p must be a number in (0, 1]": dict(temperature=0.7, top_p=1.5),
    }
    for message, settings in refused.items():
        assert error_of(turn(url, "e", images[0], "what color ?", **settings)) == (400, message)
    status, lines = turn(url, "e", images[0], "what color ?", temperature=0.7, top_p=0.9)
    assert status == 200 and 1 <= len(streamed_tokens(lines)) <= MAX_NEW_TOKENS


def test_too_many_images_are_refused_and_clear_starts_over(served, images):
    chat, url = served
    assert chat.max_images == 4
    for image in images[:3]:
        assert turn(url, "c", image, "what size ?")[0] == 200
    two_images = [{"type": "image", "data": image} for image in images[3:5]]
    status, message = error_of(post(url + "/api/chat", {"session": "c", "parts": two_images}))
    assert status == 400
    assert message.startswith("this model reads at most 4 images per conversation; it has 3 and this message adds 2")
    assert post(url + "/api/clear", {"session": "c"}) == (200, [{"cleared": True}])
    status, fresh = turn(url, "c", images[0], "what size ?")
    status_again, again = turn(url, "d", images[0], "what size ?")  # a new session: the same first turn
    assert status == status_again == 200 and streamed_tokens(fresh) == streamed_tokens(again)


def test_turns_never_run_on_the_model_at_once(served, images):
    chat, url = served
    active, most = [0], [0]
    count = threading.Lock()

    def instrumented(method):
        def call(*args, **kwargs):
            with count:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                time.sleep(0.05)  # widen the window in which an overlap would show
                return method(*args, **kwargs)
            finally:
                with count:
                    active[0] -= 1

        return call

    for name in ("prefill", "extend", "generate_from"):
        setattr(chat.model, name, instrumented(getattr(chat.model, name)))
    expected = streamed_tokens(turn(url, "solo", images[2], "what corner ?")[1])
    results = [None] * 4

    def ask(i: int) -> None:
        results[i] = turn(url, f"concurrent-{i}", images[2], "what corner ?")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert all(status == 200 and streamed_tokens(lines) == expected for status, lines in results)


def test_demo_without_a_checkpoint_says_how_to_make_one(tmp_path):
    missing = tmp_path / "none.safetensors"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "chat_demo.py"), "--checkpoint", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"no checkpoint at {missing}" in result.stderr
    assert "python examples/train_shapes.py" in result.stderr
    assert "Traceback" not in result.stderr


# -- the transformers paths of examples/chat_demo.py, on tiny local models --------------------------


def served_turn(chat, parts: list[dict]) -> list[int]:
    """One turn through the server -> the streamed tokens."""
    server = make_server(chat, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/api/chat"
        status, lines = post(url, {"session": "s", "parts": parts, "settings": {"max_new_tokens": MAX_NEW_TOKENS}})
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200, lines
    return streamed_tokens(lines)


def test_the_llama_variant_serves_its_own_greedy_reply(tmp_path, images):
    """``train_shapes.py --lm llama``'s checkpoint: a Flamingo over a transformers Llama."""
    pytest.importorskip("transformers")
    chat = shapes_chat_model(tiny_shapes_checkpoint(tmp_path / "llama.safetensors", "llama"), torch.device("cpu"))
    tokens = served_turn(chat, [{"type": "image", "data": images[0]}, {"type": "text", "text": "what shape ?"}])
    text = torch.tensor([make_tokenizer().encode("<image> what shape ?")])
    assert tokens == greedy(chat, chat.model.prefill(text, image_from_base64(images[0])[None, None]))


def test_a_save_trained_file_serves_the_models_own_replies(tmp_path):
    """``--flamingo``: the file, loaded onto a fresh copy of the LM, answers as the model that wrote it."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from chat_demo import saved_flamingo_chat
    from conftest import tiny_image_encoder
    from test_processor import tokenizer_and_lm

    from flamingo_pytorch import Flamingo
    from flamingo_pytorch.chat_server import pil_to_tensor
    from flamingo_pytorch.tokens import add_flamingo_tokens

    tokenizer, lm = tokenizer_and_lm()
    ids = add_flamingo_tokens(tokenizer, lm)
    encoder = tiny_image_encoder(32)
    sizes = dict(
        dim_head=8, heads=2, ff_mult=2, perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=3
    )
    model = Flamingo(lm, media_token_id=ids[0], vision_encoder=encoder, train_token_ids=ids, **sizes).eval()
    open_gates(model, 0.5)
    model.save_trained(str(tmp_path / "trained.safetensors"))

    fresh_tokenizer, fresh_lm = tokenizer_and_lm()
    transform = lambda image: pil_to_tensor(image, 8)  # noqa: E731
    chat = saved_flamingo_chat(
        tmp_path / "trained.safetensors", fresh_lm, fresh_tokenizer, encoder, transform, max_images=9
    )
    assert chat.max_images == 3  # the resampler's limit wins over the flag
    image = png_base64(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2)))
    tokens = served_turn(chat, [{"type": "image", "data": image}, {"type": "text", "text": "the cat"}])

    text = torch.tensor([tokenizer("<image> the cat")["input_ids"]])
    state = model.prefill(text, image_from_base64(image)[None, None])
    new = model.generate_from(state, max_new_tokens=MAX_NEW_TOKENS, temperature=0, eos_token_id=ids[1])
    assert tokens == until_eos(new[0].tolist(), ids[1])


def test_an_openflamingo_checkpoint_serves_through_the_demos_arguments(tmp_path, monkeypatch):
    """``--openflamingo``: a checkpoint written by OpenFlamingo's own classes, the downloads replaced by
    tiny local models (as tests/test_openflamingo.py does), served from the demo's command line."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("open_flamingo", reason="pip install --no-deps open-flamingo==2.0.1")
    import chat_demo
    from test_openflamingo import released, stand_in_clip, stand_in_lm, stand_in_tokenizer, their_factory_model

    theirs = their_factory_model()
    ids = [theirs.eoc_token_id, theirs.media_token_id]
    torch.save(released(theirs), tmp_path / "checkpoint.pt")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", stand_in_clip)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: stand_in_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: stand_in_lm())
    argv = ["--openflamingo", str(tmp_path / "checkpoint.pt"), "--lm", "mpt", "--clip", "ViT-L-14", "--device", "cpu"]
    chat = chat_demo.build_chat_model(chat_demo.parse_args(argv))
    assert (chat.max_images, chat.eos_token_id) == (5, ids[0])  # no media-time embeddings: --max-images
    image = png_base64(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)))
    tokens = served_turn(chat, [{"type": "image", "data": image}, {"type": "text", "text": "Output:"}])

    text = torch.tensor([chat.prefix_ids + chat.encode("<image> Output:")])
    state = chat.model.prefill(text, image_from_base64(image)[None, None])
    new = chat.model.generate_from(state, max_new_tokens=MAX_NEW_TOKENS, temperature=0, eos_token_id=ids[0])
    assert tokens == until_eos(new[0].tolist(), ids[0])
    assert chat.encode("<image> Output:")[0] == ids[1]  # <image> is one token, the model's media token
