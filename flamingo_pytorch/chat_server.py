"""A web chat with a Flamingo model: Python's own HTTP server, one page, replies streamed token by token.

The server is model-agnostic: it takes a ``ChatModel``, the model plus how to turn text into token
ids and back and an image into a tensor. ``examples/chat_demo.py`` builds one for the shapes demo,
for OpenFlamingo checkpoints and for ``save_trained`` files.

Each browser session holds one conversation (the model's ``prefill`` for its first turn,
``extend`` for the next ones, ``generate_from`` for each reply). One lock per model serializes the
turns of all sessions: a request waits for the one before it, none runs beside it on the model.

HTTP API (JSON in; errors are ``{"error": message}`` with a 4xx status, never a traceback):

    GET  /              the page (``chat_page.PAGE``)
    GET  /api/info      {"max_images": ..., "image_token": ...}
    POST /api/chat      {"session": id, "parts": [{"type": "text", "text": ...} | {"type": "image",
                        "data": base64 or data URL}, ...], "settings": {"max_new_tokens", "temperature",
                        "top_p"}} -> NDJSON lines {"token": id, "text": new text, "reply": so far}, then
                        {"done": true, "reply": text, "tokens": [ids]}
    POST /api/clear     {"session": id}: the session's conversation starts over
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch import Tensor, nn

from flamingo_pytorch.chat_page import PAGE

MAX_IMAGE_BYTES = 10 * 2**20  # per uploaded image, after base64 decoding
MAX_IMAGE_SIDE = 4096  # pixels, width and height
MAX_BODY_BYTES = 64 * 2**20  # one request
MAX_SESSIONS = 64  # conversations kept; the least recently used is dropped beyond this
MAX_NEW_TOKENS = 512


class ChatError(ValueError):
    """A request the chat refuses; its message is shown in the page. ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class ChatModel:
    """A model and what the chat needs to talk to it.

    Args:
        model: a ``FlamingoPaLM`` or ``Flamingo`` (anything with ``prefill``, ``extend``, ``generate_from``).
        encode: text -> token ids; raises ValueError for text it cannot encode.
        decode: token ids -> text.
        image_tensor: a PIL image (RGB) -> (c, H, W) float tensor, resized and normalized as the model was trained.
        image_token: the text that stands for an image in a prompt, e.g. ``"<image>"``.
        eos_token_id: the token that ends a reply (None: replies run to ``max_new_tokens``).
        max_images: the most images one conversation may hold (None: no limit).
        prefix_ids: token ids put before the first turn of a conversation (e.g. a BOS token).
        pad_token_id: filler the model writes after ``eos_token_id``.
        device: where the inputs go.
    """

    model: nn.Module
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    image_tensor: Callable[[object], Tensor]
    image_token: str
    eos_token_id: int | None
    max_images: int | None
    prefix_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Settings:
    """How a reply is decoded: ``temperature`` 0 is greedy; ``top_p`` None samples from all tokens."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None

    @classmethod
    def from_json(cls, data: object) -> Settings:
        if not isinstance(data, dict):
            raise ChatError("settings must be an object")
        settings = cls(**{key: data[key] for key in ("max_new_tokens", "temperature", "top_p") if key in data})

        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        steps = settings.max_new_tokens
        if not number(steps) or steps != int(steps) or not 1 <= steps <= MAX_NEW_TOKENS:
            raise ChatError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}")
        settings.max_new_tokens = int(steps)
        if not number(settings.temperature) or settings.temperature < 0:
            raise ChatError("temperature must be a number >= 0 (0 is greedy)")
        if settings.top_p is not None and (not number(settings.top_p) or not 0 < settings.top_p <= 1):
            raise ChatError("top-p must be a number in (0, 1]")
        return settings


def pil_to_tensor(image, size: int) -> Tensor:
    """A PIL image -> (3, size, size) float tensor in [0, 1]: RGB, resized bilinearly, not normalized."""
    from PIL import Image

    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 255  # (3, H, W)


def read_image(data: str, index: int):
    """An uploaded image (base64, or a data URL) -> a PIL image in RGB; ChatError if it is not one we take."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise ChatError(f"image {index} must be a base64 string")
    data = data.split(",", 1)[1] if data.startswith("data:") else data
    too_large = ChatError(
        f"image {index} is over the limit of {byte_count(MAX_IMAGE_BYTES)}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    )
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:  # refused before decoding
        raise too_large
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ChatError(f"image {index} is not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise too_large
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only: the size is known before decoding
        width, height = image.size
        if max(width, height) > MAX_IMAGE_SIDE:
            raise ChatError(
                f"image {index} is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise ChatError(f"image {index} is not an image that can be read (PNG, JPEG, GIF, WebP, ...)") from None


def byte_count(count: int) -> str:
    return f"{count / 2**20:g} MB" if count >= 2**20 else f"{count} bytes"


def read_turn(parts: object, image_token: str) -> tuple[str, list]:
    """The request's parts -> (prompt text with ``image_token`` where each image sits, the PIL images)."""
    if not isinstance(parts, list) or not parts:
        raise ChatError("the message is empty: type a question or add an image")
    pieces, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"].strip():
                pieces.append(part["text"].strip())
        elif kind == "image":
            images.append(read_image(part.get("data"), len(images) + 1))
            pieces.append(image_token)
        else:
            raise ChatError("each part must be {'type': 'text', 'text': ...} or {'type': 'image', 'data': ...}")
    if not pieces:
        raise ChatError("the message is empty: type a question or add an image")
    return " ".join(pieces), images


class TokenStreamer:
    """transformers' streamer protocol: ``put`` gets the conversation so far, then each new token (b,);
    ``end`` closes. Calls ``on_start()`` once, then ``on_token(id, new text, reply so far)`` per token up to the
    end of the reply. The new text is "" while a character is cut between byte-level tokens, or where
    decoding the longer reply rewrote its earlier text (the reply so far is then the one to show)."""

    def __init__(self, chat: ChatModel, on_start: Callable[[], None], on_token: Callable[[int, str, str], None]):
        self.chat, self.on_start, self.on_token = chat, on_start, on_token
        self.started, self.finished = False, False
        self.ids: list[int] = []
        self.text = ""

    def put(self, value: Tensor) -> None:
        if not self.started:  # the prompt
            self.started = True
            self.on_start()
            return
        if self.finished:
            return
        token = int(value.reshape(-1)[0])
        self.ids.append(token)
        self.finished = token == self.chat.eos_token_id
        text = self.chat.decode(self.ids)
        if text.endswith("\ufffd"):  # a character cut between byte-level tokens: wait for the rest of it
            self.on_token(token, "", self.text)
            return
        piece = text[len(self.text) :] if text.startswith(self.text) else ""  # "": decoding rewrote earlier text
        self.text = text
        self.on_token(token, piece, text)

    def end(self) -> None:
        self.finished = True


class ChatService:
    """The conversations of all sessions over one ``ChatModel``; turns run one at a time on the model."""

    def __init__(self, chat: ChatModel):
        self.chat = chat
        self.lock = threading.Lock()  # one generation at a time on the model; the others wait their turn
        self.sessions: OrderedDict[str, object] = OrderedDict()  # session -> its conversation (prefill's state)

    def clear(self, session: str) -> None:
        with self.lock:
            self.sessions.pop(session, None)

    def reply(
        self,
        session: str,
        parts: object,
        settings: Settings,
        on_start: Callable[[], None] = lambda: None,
        on_token: Callable[[int, str, str], None] = lambda token, text, reply: None,
    ) -> list[int]:
        """Add the user's turn to ``session``'s conversation and decode a reply -> its tokens (to eos).

        ``on_start`` runs once the turn is accepted (before the first token); ChatError before that.
        """
        chat = self.chat
        prompt, pictures = read_turn(parts, chat.image_token)
        try:
            ids = chat.encode(prompt)
        except ValueError as error:
            raise ChatError(str(error)) from None
        images = [chat.image_tensor(picture) for picture in pictures]
        with self.lock:
            state = self.sessions.get(session)
            earlier = 0 if state is None else state.num_media  # the chat never pads: one slot per image
            if chat.max_images is not None and earlier + len(images) > chat.max_images:
                raise ChatError(
                    f"this model reads at most {chat.max_images} images per conversation; it has {earlier} and "
                    f"this message adds {len(images)}: press Clear to start a new conversation"
                )
            text = torch.tensor([(chat.prefix_ids if state is None else []) + ids], device=chat.device)  # (1, n)
            media = torch.stack(images)[None].to(chat.device) if images else None  # (1, t, c, H, W)
            try:
                if state is None:
                    state = chat.model.prefill(text, media, max_new_tokens=settings.max_new_tokens)
                else:
                    chat.model.extend(state, text, media)
            except ValueError as error:
                raise ChatError(str(error)) from None
            self.sessions[session] = state
            self.sessions.move_to_end(session)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return self.generate(state, settings, TokenStreamer(chat, on_start, on_token))

    def generate(self, state, settings: Settings, streamer: TokenStreamer) -> list[int]:
        chat = self.chat
        new = chat.model.generate_from(
            state,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            eos_token_id=chat.eos_token_id,
            pad_token_id=chat.pad_token_id,
            streamer=streamer,
        )
        tokens = new[0].tolist()
        if chat.eos_token_id in tokens:
            tokens = tokens[: tokens.index(chat.eos_token_id) + 1]
        return tokens


class ChatHandler(BaseHTTPRequestHandler):
    """The page and the JSON API (see the module docstring); ``server.service`` is the ``ChatService``."""

    server_version = "FlamingoChat/1"

    def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise in a demo
        pass

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self.send_body(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif self.path == "/api/info":
            chat = self.server.service.chat
            self.send_json(HTTPStatus.OK, {"max_images": chat.max_images, "image_token": chat.image_token})
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:
        try:
            body = self.read_json()
            session = body.get("session")
            if not isinstance(session, str) or not 0 < len(session) <= 100:
                raise ChatError("session must be a string of 1 to 100 characters")
            if self.path == "/api/clear":
                self.server.service.clear(session)
                self.send_json(HTTPStatus.OK, {"cleared": True})
            elif self.path == "/api/chat":
                self.chat(session, body)
            else:
                self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
        except ChatError as error:
            self.send_json(error.status, {"error": str(error)})
        except Exception as error:  # a bug: the traceback goes to the server's log, a message to the page
            traceback.print_exc()
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the server failed: {error}"})

    def read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            message = f"the message is over the limit of {byte_count(MAX_BODY_BYTES)}"
            raise ChatError(message, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ChatError("the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ChatError("the request body must be a JSON object")
        return body

    def chat(self, session: str, body: dict) -> None:
        settings = Settings.from_json(body.get("settings", {}))
        sent = []

        def start() -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            sent.append(True)

        def token(token_id: int, text: str, reply: str) -> None:
            self.write_line({"token": token_id, "text": text, "reply": reply})

        try:
            tokens = self.server.service.reply(session, body.get("parts"), settings, start, token)
        except Exception as error:
            if not sent:
                raise
            traceback.print_exc()
            self.write_line({"error": f"generation failed: {error}"})
            return
        self.write_line({"done": True, "reply": self.server.service.chat.decode(tokens), "tokens": tokens})

    def write_line(self, data: dict) -> None:
        try:
            self.wfile.write(json.dumps(data).encode() + b"\n")
            self.wfile.flush()
        except OSError:  # the page went away: the reply still completes, so the conversation stays whole
            pass

    def send_json(self, status: int, data: dict) -> None:
        self.send_body(status, json.dumps(data).encode(), "application/json")

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A ``ThreadingHTTPServer`` serving ``chat`` (call ``serve_forever``); port 0 picks a free port."""
    server = ThreadingHTTPServer((host, port), ChatHandler)
    server.daemon_threads = True
    server.service = ChatService(chat)
    return server
