"""Executes one scheduled step: flat batch in, logits for the sampled rows out."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from kvos.attention.contiguous import KVSpan
from kvos.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from kvos.engine.scheduler import ScheduledChunk
from kvos.memory.kv_manager import KVCacheManager
from kvos.model import compiled_decode
from kvos.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model; reads KV placement from the manager, never allocates."""

    def __init__(
        self, model: LlamaForCausalLM, kv_manager: KVCacheManager, device: torch.device, compile_decode: bool = False
    ) -> None:
        self.model = model
        self.kv = kv_manager
        self.device = device
        self._decode_forward = compiled_decode.compile_decode(model) if compile_decode else model.forward

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the chunks; return logits (R, V) for those that complete their known tokens, in order."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        decode_rows: list[int] = []
        decode_indices: list[torch.Tensor] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        spans: list[KVSpan] | None = [] if getattr(self.kv, "contiguous", False) else None
        for chunk in chunks:
            request, n = chunk.request, chunk.num_tokens
            start = request.num_computed_tokens
            end = start + n
            row = len(input_ids)
            input_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            indices = self.kv.kv_indices(request, end)
            slot_parts.append(indices[start:])
            if spans is not None:
                spans.append(KVSpan(row, n, self.kv.kv_start(request), start))
            elif n == 1:
                decode_rows.append(row)
                decode_indices.append(indices)
            else:
                prefills.append(PrefillChunk(row, n, start, indices))
            if chunk.completes_known_tokens:
                sample_rows.append(row + n - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts),
            decode=self._decode_batch(decode_rows, decode_indices, len(input_ids)),
            prefills=prefills,
            spans=spans,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        # Compiled graphs assume a context of 2+ tokens; one-token prompts run eagerly.
        pure_decode = meta.decode is not None and meta.decode.all_rows and meta.decode.kv_indices.shape[1] > 1
        forward = self._decode_forward if pure_decode else self.model
        hidden = forward(ids, pos, self.kv.kv_caches, meta)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def warm_up_decode(self, batch_sizes: Sequence[int]) -> None:
        """Run a throw-away decode step per batch size, so a compiled forward compiles now.

        Every sequence's context is cache slot 0 repeated. Nothing holds KV
        memory at start-up, so the step overwrites nothing in use.
        """
        start = time.monotonic()
        for batch_size in batch_sizes:
            contexts = [torch.zeros(batch_size + 1, dtype=torch.long, device=self.device)] * batch_size
            meta = AttentionMetadata(
                slot_mapping=torch.zeros(batch_size, dtype=torch.long, device=self.device),
                decode=self._decode_batch(list(range(batch_size)), contexts, batch_size),
                prefills=[],
            )
            ids = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            positions = torch.full_like(ids, batch_size)
            compiled_decode.mark_dynamic_sizes(ids, positions, meta)
            self._decode_forward(ids, positions, self.kv.kv_caches, meta)
        logger.info(
            "decode step ready for batch sizes %s in %.1fs", ", ".join(map(str, batch_sizes)), time.monotonic() - start
        )

    def _decode_batch(self, rows: list[int], indices: list[torch.Tensor], num_tokens: int) -> DecodeBatch | None:
        if not rows:
            return None
        lengths = torch.tensor([len(i) for i in indices], device=self.device)
        max_len = int(lengths.max())
        # Padding repeats the request's own first slot, which is always backed by
        # memory (slot 0 may sit on an unmapped page of a virtual cache); the mask hides it.
        padded = torch.zeros(len(rows), max_len, dtype=torch.long, device=self.device)
        for b, idx in enumerate(indices):
            padded[b, : len(idx)] = idx
            padded[b, len(idx) :] = idx[0]
        mask = torch.arange(max_len, device=self.device)[None, :] < lengths[:, None]
        return DecodeBatch(
            token_rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            kv_indices=padded,
            mask=mask[:, None, None, :],
            all_rows=len(rows) == num_tokens,
        )
