"""Virtual contiguous KV cache (vAttention): reserved address space, pages on demand."""

from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager

__all__ = ["VirtualKVCacheManager"]
