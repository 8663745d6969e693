"""Where each layer's K and V live inside one reserved region, and which pages a row needs.

Two layouts, both `[slot, token, ...]` so a request's tokens form one growing
run of bytes per plane (a plane is an independently paged sub-range):

    per_layer:  2 x num_layers planes, plane (layer, K|V) = [num_rows, row_tokens, kv_heads, head_dim]
                a row's first n tokens touch n * kv_heads * head_dim * itemsize bytes in EACH plane
    megacache:  1 plane = [num_rows, row_tokens, num_layers, 2 (K|V), kv_heads, head_dim]
                a row's first n tokens are n * bytes_per_token bytes in one run

A request wastes at most one partly filled page per plane, so the per-layer
layout wastes up to 2 x num_layers pages per request and the megacache one.
With 4 KiB host pages both are small; with 2 MiB GPU pages the per-layer one
wastes a whole page (about a thousand tokens of an 8B model) per layer per
request, which is why megacache is the default. Layers are read from the
megacache through strides (`[token] -> num_layers * 2 * kv_heads * head_dim`).

`row_tokens` is `max_context` rounded up so every row starts on a page
boundary; flat index `row * row_tokens + position` addresses a token in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LayoutKind = Literal["megacache", "per_layer"]


@dataclass(frozen=True)
class KVLayout:
    """Geometry of the virtual KV buffers: sizes in tokens, bytes and pages."""

    kind: LayoutKind
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    num_rows: int
    max_context: int
    page_size: int

    def __post_init__(self) -> None:
        if self.kind not in ("megacache", "per_layer"):
            raise ValueError(f"layout must be 'megacache' or 'per_layer', got {self.kind!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_rows", "max_context", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer for one token: what one token really costs."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def num_planes(self) -> int:
        return 1 if self.kind == "megacache" else 2 * self.num_layers

    @property
    def plane_token_bytes(self) -> int:
        return self.bytes_per_token // self.num_planes

    @property
    def row_tokens(self) -> int:
        """Token stride between rows: max_context padded so rows start on page boundaries."""
        tokens_per_alignment = self.page_size // math.gcd(self.page_size, self.plane_token_bytes)
        return -(-self.max_context // tokens_per_alignment) * tokens_per_alignment

    @property
    def row_pages(self) -> int:
        """Pages per row in one plane."""
        return self.row_tokens * self.plane_token_bytes // self.page_size

    @property
    def num_pages(self) -> int:
        return self.num_planes * self.num_rows * self.row_pages

    @property
    def num_bytes(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages per plane that hold a row's first `num_tokens` tokens."""
        return -(-num_tokens * self.plane_token_bytes // self.page_size)

    def tokens_in(self, num_pages: int) -> int:
        """Whole tokens that fit in a row's first `num_pages` pages (per plane)."""
        return num_pages * self.page_size // self.plane_token_bytes

    def page_runs(self, row: int, first: int, count: int) -> list[tuple[int, int]]:
        """Region pages (first, count) of row pages `[first, first + count)`, one run per plane."""
        plane_pages = self.num_rows * self.row_pages
        start = row * self.row_pages + first
        return [(plane * plane_pages + start, count) for plane in range(self.num_planes)]

    def token_runs(self, row: int, num_tokens: int) -> list[tuple[int, int]]:
        """Region bytes (start, length) holding a row's first `num_tokens` tokens, one run per plane."""
        plane_bytes = self.num_rows * self.row_pages * self.page_size
        start = row * self.row_pages * self.page_size
        length = num_tokens * self.plane_token_bytes
        return [(plane * plane_bytes + start, length) for plane in range(self.num_planes)]

    def layer_views(self, region_bytes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) over the region, each `[num_rows * row_tokens, kv_heads, head_dim]`.

        Pure views: nothing is read or written, so no page is touched.
        """
        if region_bytes.numel() < self.num_bytes:
            raise ValueError(f"region of {region_bytes.numel()} bytes is smaller than the layout's {self.num_bytes}")
        elements = region_bytes[: self.num_bytes].view(self.dtype)
        num_slots = self.num_rows * self.row_tokens
        token_elements = self.num_kv_heads * self.head_dim
        if self.kind == "per_layer":
            planes = elements.view(2 * self.num_layers, num_slots, self.num_kv_heads, self.head_dim)
            return [(planes[2 * layer], planes[2 * layer + 1]) for layer in range(self.num_layers)]
        stride = (2 * self.num_layers * token_elements, self.head_dim, 1)
        size = (num_slots, self.num_kv_heads, self.head_dim)
        return [
            (
                elements.as_strided(size, stride, (2 * layer) * token_elements),
                elements.as_strided(size, stride, (2 * layer + 1) * token_elements),
            )
            for layer in range(self.num_layers)
        ]
