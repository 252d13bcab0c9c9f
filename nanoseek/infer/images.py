"""Images a chat request names by URL (OpenAI's `image_url` content parts) -> decoded RGB PIL images.

    data:image/png;base64,...   decoded here: the way a client sends an image
    file:///abs/path.png        read only under the directory a server allows (`nanoseek serve
                                --allow-local-images DIR`), refused otherwise
    http(s)://...               refused: the server makes no network requests (no fetching on a client's behalf,
                                no engine time spent waiting on someone else's host)

Decoding is `nanoseek.data.curate.images.open_image`, the check every training image passes: PNG, JPEG, WebP, GIF
(its first frame) or BMP; at most max_pixels, read from the header before a pixel is decoded (a decompression bomb
is refused unread); then decoded in full, so a truncated file is a bad request now and never reaches the engine.
Every refusal is an `ImageError` (a ValueError) whose message starts with where the image was (`where`, e.g.
`messages[0].content[1]`).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from nanoseek.data.curate.images import MAX_PIXELS, open_image


class ImageError(ValueError):
    """An image a request cannot use; the message says where and why."""


class _Named(io.BytesIO):
    """Image bytes that print as where they came from (open_image names its input in every message)."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __str__(self) -> str:
        return self.where


def decode_image(data: bytes | Path, where: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image bytes (or a file) -> a decoded RGB image, or ImageError."""
    try:
        return open_image(data if isinstance(data, Path) else _Named(data, where), max_pixels)
    except ValueError as e:
        raise ImageError(f"{where}: {e}" if isinstance(data, Path) else str(e)) from None
    except Exception as e:  # noqa: BLE001 — a decoder fed untrusted bytes may raise anything: still a bad image
        raise ImageError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


def data_url_bytes(url: str, where: str) -> bytes:
    """The bytes of `data:[image/...];base64,DATA` (RFC 2397); a non-image media type or bad base64 is refused."""
    head, comma, payload = url.removeprefix("data:").partition(",")
    if not comma:
        raise ImageError(f"{where}: malformed data URL (expected data:image/png;base64,...)")
    media, *options = (p.strip().lower() for p in head.split(";"))
    if "base64" not in options:
        raise ImageError(f"{where}: the data URL must be base64-encoded (data:image/png;base64,...)")
    if media and not media.startswith("image/"):
        raise ImageError(f"{where}: the data URL's media type {media!r} is not an image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data URL's payload is not valid base64") from None
    if not data:
        raise ImageError(f"{where}: the data URL holds no image data")
    return data


def local_image_path(url: str, where: str, local_dir: Path | None) -> Path:
    """The file a `file://` URL names, if it lies under local_dir (symlinks resolved first)."""
    if local_dir is None:
        raise ImageError(f"{where}: file URLs are refused (a server started with --allow-local-images DIR reads "
                         "images under DIR); send the image as a data URL")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"{where}: file URLs must name a local path (file:///path), not host {parts.netloc!r}")
    path = Path(unquote(parts.path)).resolve()
    if not path.is_relative_to(local_dir.resolve()):
        raise ImageError(f"{where}: {unquote(parts.path)} is outside the directory this server reads images from")
    if not path.is_file():
        raise ImageError(f"{where}: no such image file {unquote(parts.path)}")
    return path


def load_image_url(url: str, where: str, max_pixels: int = MAX_PIXELS, local_dir: Path | None = None
                   ) -> Image.Image:
    """The decoded image an `image_url` names (the module docstring says which URLs), or ImageError."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(data_url_bytes(url, where), where, max_pixels)
    if scheme == "file":
        return decode_image(local_image_path(url, where, local_dir), where, max_pixels)
    if scheme in ("http", "https"):
        raise ImageError(f"{where}: remote image URLs are not fetched (this server makes no network requests); "
                         "send the image as a data URL (data:image/png;base64,...)")
    raise ImageError(f"{where}: unsupported image URL {url[:40]!r}; send a data URL (data:image/png;base64,...)")
