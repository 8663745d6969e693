"""A fake CUDA driver for testing the CUDA region without a GPU.

`FakeDevice` is the driver's truth for one GPU: reserved ranges, live
allocation handles, what is mapped where and with what access, the context
stack. Two adapters put it under the region's two real driver paths:
`FakeBindings` stands in for the `cuda.bindings.driver` module and
`FakeLibcuda` for libcuda loaded through ctypes, so the real wrapper code
(`_BindingsDriver`, `_CtypesDriver`) runs against it.

Any call can be made to fail on its Nth invocation (`fail_call`), or every
call from the Nth on (`fail_from`, a dead context). Calls the region should
never make (unmapping what is not mapped, freeing a range with pages still
mapped, memory calls without a current context) are recorded in `misuse`.
"""

from __future__ import annotations

import enum
from types import SimpleNamespace
from typing import Any

import torch

from kvos.memory.virtual.cuda_backend import CudaRegion, _BindingsDriver, _CtypesDriver

SUCCESS = 0
INVALID_VALUE = 1
OUT_OF_MEMORY = 2
UNKNOWN = 999
_NAMES = {
    SUCCESS: b"CUDA_SUCCESS",
    INVALID_VALUE: b"CUDA_ERROR_INVALID_VALUE",
    OUT_OF_MEMORY: b"CUDA_ERROR_OUT_OF_MEMORY",
    UNKNOWN: b"CUDA_ERROR_UNKNOWN",
}
CONTEXT = 0x77
PATHS = ["bindings", "ctypes"]


class FakeDevice:
    """What the driver knows; each method returns an error code and, where the call has one, a value."""

    def __init__(self, granularity: int = 4096, capacity_pages: int | None = None) -> None:
        self.granularity = granularity
        self.capacity_pages = capacity_pages
        """Handles the device can hold at once; cuMemCreate answers OUT_OF_MEMORY beyond."""
        self.reserved: dict[int, int] = {}
        self.live: set[int] = set()
        self.mapped: dict[int, int] = {}
        self.access: set[int] = set()
        self.num_created = 0
        self.num_released = 0
        self.retained = 0
        self.ctx_stack: list[int] = []
        self.calls: list[str] = []
        self.misuse: list[str] = []
        self._failures: dict[int, int] = {}
        self._fail_from: tuple[int, int] | None = None
        self._next_address = 1 << 40
        self._next_handle = 1

    # -- failure injection ------------------------------------------------------------

    def fail_call(self, index: int, code: int = UNKNOWN) -> None:
        """Make call number `index` (counted over the device's life, from 0) fail with `code`."""
        self._failures[index] = code

    def fail_from(self, index: int, code: int = UNKNOWN) -> None:
        """Make every call from number `index` on fail, as a dead context does."""
        self._fail_from = (index, code)

    def reset(self) -> None:
        """Forget everything, as a fresh device (the previous region must have been closed)."""
        self.__init__(self.granularity, self.capacity_pages)  # type: ignore[misc]

    def heal(self) -> None:
        self._failures.clear()
        self._fail_from = None

    def _enter(self, name: str, needs_context: bool = True) -> int:
        index = len(self.calls)
        self.calls.append(name)
        if index in self._failures:
            return self._failures[index]
        if self._fail_from is not None and index >= self._fail_from[0]:
            return self._fail_from[1]
        if needs_context and not self.ctx_stack:
            return self._misuse(f"{name} without a current context")
        return SUCCESS

    def _misuse(self, what: str) -> int:
        self.misuse.append(what)
        return INVALID_VALUE

    # -- the driver's calls -------------------------------------------------------------

    def init(self) -> int:
        return self._enter("cuInit", needs_context=False)

    def version(self) -> tuple[int, int]:
        return self._enter("cuDriverGetVersion", needs_context=False), 12040

    def device_get(self, ordinal: int) -> tuple[int, int]:
        return self._enter("cuDeviceGet", needs_context=False), ordinal

    def retain(self) -> tuple[int, int]:
        code = self._enter("cuDevicePrimaryCtxRetain", needs_context=False)
        if code == SUCCESS:
            self.retained += 1
        return code, CONTEXT

    def release_context(self) -> int:
        code = self._enter("cuDevicePrimaryCtxRelease", needs_context=False)
        if code == SUCCESS:
            if self.retained == 0:
                return self._misuse("primary context released more often than retained")
            self.retained -= 1
        return code

    def push(self, context: int) -> int:
        code = self._enter("cuCtxPushCurrent", needs_context=False)
        if code == SUCCESS:
            if context != CONTEXT:
                return self._misuse(f"pushed unknown context {context:#x}")
            self.ctx_stack.append(context)
        return code

    def pop(self) -> int:
        code = self._enter("cuCtxPopCurrent", needs_context=False)
        if code == SUCCESS:
            self.ctx_stack.pop()
        return code

    def synchronize(self) -> int:
        return self._enter("cuCtxSynchronize")

    def get_granularity(self) -> tuple[int, int]:
        return self._enter("cuMemGetAllocationGranularity", needs_context=False), self.granularity

    def reserve(self, num_bytes: int, alignment: int) -> tuple[int, int]:
        code = self._enter("cuMemAddressReserve")
        if code != SUCCESS:
            return code, 0
        if num_bytes % self.granularity or alignment % self.granularity:
            return self._misuse(f"reserve of {num_bytes} bytes aligned to {alignment}"), 0
        address = self._next_address
        self._next_address += num_bytes + self.granularity
        self.reserved[address] = num_bytes
        return SUCCESS, address

    def free_address(self, address: int, num_bytes: int) -> int:
        code = self._enter("cuMemAddressFree")
        if code != SUCCESS:
            return code
        if self.reserved.get(address) != num_bytes:
            return self._misuse(f"free of unreserved range {address:#x}")
        if any(address <= page < address + num_bytes for page in self.mapped):
            return self._misuse("free of a range with pages still mapped")
        del self.reserved[address]
        return SUCCESS

    def create(self, num_bytes: int) -> tuple[int, int]:
        code = self._enter("cuMemCreate")
        if code != SUCCESS:
            return code, 0
        if num_bytes != self.granularity:
            return self._misuse(f"create of {num_bytes} bytes"), 0
        if self.capacity_pages is not None and len(self.live) >= self.capacity_pages:
            return OUT_OF_MEMORY, 0
        handle = self._next_handle
        self._next_handle += 1
        self.live.add(handle)
        self.num_created += 1
        return SUCCESS, handle

    def release(self, handle: int) -> int:
        code = self._enter("cuMemRelease")
        if code != SUCCESS:
            return code
        if handle not in self.live or handle in self.mapped.values():
            return self._misuse(f"release of handle {handle} (dead or mapped)")
        self.live.remove(handle)
        self.num_released += 1
        return SUCCESS

    def map(self, address: int, num_bytes: int, offset: int, handle: int) -> int:
        code = self._enter("cuMemMap")
        if code != SUCCESS:
            return code
        inside = any(base <= address and address + num_bytes <= base + size for base, size in self.reserved.items())
        if not inside or num_bytes != self.granularity or offset or address in self.mapped:
            return self._misuse(f"map at {address:#x} (outside, unaligned or already mapped)")
        if handle not in self.live or handle in self.mapped.values():
            return self._misuse(f"map of handle {handle} (dead or mapped elsewhere)")
        self.mapped[address] = handle
        return SUCCESS

    def set_access(self, address: int, num_bytes: int) -> int:
        code = self._enter("cuMemSetAccess")
        if code != SUCCESS:
            return code
        if address not in self.mapped:
            return self._misuse(f"access set on unmapped {address:#x}")
        self.access.add(address)
        return SUCCESS

    def unmap(self, address: int, num_bytes: int) -> int:
        code = self._enter("cuMemUnmap")
        if code != SUCCESS:
            return code
        if address not in self.mapped:
            return self._misuse(f"unmap of unmapped {address:#x}")
        del self.mapped[address]
        self.access.discard(address)
        return SUCCESS


class _CUresult(enum.IntEnum):
    CUDA_SUCCESS = SUCCESS
    CUDA_ERROR_INVALID_VALUE = INVALID_VALUE
    CUDA_ERROR_OUT_OF_MEMORY = OUT_OF_MEMORY
    CUDA_ERROR_UNKNOWN = UNKNOWN


class _Prop:
    def __init__(self) -> None:
        self.type = 0
        self.location = SimpleNamespace(type=0, id=0)
        self.flags = 0


class FakeBindings:
    """The parts of `cuda.bindings.driver` the region uses: each call returns (CUresult, *values)."""

    CUresult = _CUresult
    CUmemAllocationType = SimpleNamespace(CU_MEM_ALLOCATION_TYPE_PINNED=1)
    CUmemLocationType = SimpleNamespace(CU_MEM_LOCATION_TYPE_DEVICE=1)
    CUmemAccess_flags = SimpleNamespace(CU_MEM_ACCESS_FLAGS_PROT_READWRITE=3)
    CUmemAllocationGranularity_flags = SimpleNamespace(CU_MEM_ALLOC_GRANULARITY_MINIMUM=0)
    CUmemAllocationProp = _Prop
    CUmemAccessDesc = _Prop

    def __init__(self, device: FakeDevice) -> None:
        self.device = device

    def cuGetErrorName(self, error: _CUresult) -> tuple[_CUresult, bytes]:
        return _CUresult.CUDA_SUCCESS, _NAMES[int(error)]

    def cuInit(self, flags: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.init()),)

    def cuDriverGetVersion(self) -> tuple[_CUresult, int]:
        code, value = self.device.version()
        return _CUresult(code), value

    def cuDeviceGet(self, ordinal: int) -> tuple[_CUresult, int]:
        code, value = self.device.device_get(ordinal)
        return _CUresult(code), value

    def cuDevicePrimaryCtxRetain(self, device: int) -> tuple[_CUresult, int]:
        code, value = self.device.retain()
        return _CUresult(code), value

    def cuDevicePrimaryCtxRelease(self, device: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.release_context()),)

    def cuCtxPushCurrent(self, context: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.push(context)),)

    def cuCtxPopCurrent(self) -> tuple[_CUresult, int]:
        return _CUresult(self.device.pop()), CONTEXT

    def cuCtxSynchronize(self) -> tuple[_CUresult]:
        return (_CUresult(self.device.synchronize()),)

    def cuMemGetAllocationGranularity(self, prop: _Prop, flag: int) -> tuple[_CUresult, int]:
        code, value = self.device.get_granularity()
        return _CUresult(code), value

    def cuMemAddressReserve(self, size: int, alignment: int, address: int, flags: int) -> tuple[_CUresult, int]:
        code, value = self.device.reserve(size, alignment)
        return _CUresult(code), value

    def cuMemAddressFree(self, address: int, size: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.free_address(address, size)),)

    def cuMemCreate(self, size: int, prop: _Prop, flags: int) -> tuple[_CUresult, int]:
        code, value = self.device.create(size)
        return _CUresult(code), value

    def cuMemRelease(self, handle: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.release(handle)),)

    def cuMemMap(self, address: int, size: int, offset: int, handle: int, flags: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.map(address, size, offset, handle)),)

    def cuMemSetAccess(self, address: int, size: int, descs: list[_Prop], count: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.set_access(address, size)),)

    def cuMemUnmap(self, address: int, size: int) -> tuple[_CUresult]:
        return (_CUresult(self.device.unmap(address, size)),)


class _Function:
    """A libcuda symbol: callable, and takes the argtypes/restype the driver sets on it."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.argtypes: list[Any] = []
        self.restype: Any = None

    def __call__(self, *args: Any) -> int:
        return int(self.body(*args))


def _out(pointer: Any, value: Any) -> None:
    pointer.contents.value = value


class FakeLibcuda:
    """libcuda as ctypes sees it: out-parameters arrive as ctypes pointers and are written through."""

    def __init__(self, device: FakeDevice) -> None:
        d = device
        self.device = device

        def with_value(result: tuple[int, Any], pointer: Any) -> int:
            code, value = result
            if code == SUCCESS:
                _out(pointer, value)
            return code

        def error_name(code: int, name: Any) -> int:
            _out(name, _NAMES[code])
            return SUCCESS

        bodies = {
            "cuInit": lambda flags: d.init(),
            "cuDriverGetVersion": lambda out: with_value(d.version(), out),
            "cuDeviceGet": lambda out, ordinal: with_value(d.device_get(ordinal), out),
            "cuDevicePrimaryCtxRetain": lambda out, dev: with_value(d.retain(), out),
            "cuDevicePrimaryCtxRelease_v2": lambda dev: d.release_context(),
            "cuCtxPushCurrent_v2": lambda context: d.push(context.value),
            "cuCtxPopCurrent_v2": lambda out: with_value((d.pop(), CONTEXT), out),
            "cuCtxSynchronize": lambda: d.synchronize(),
            "cuGetErrorName": error_name,
            "cuMemGetAllocationGranularity": lambda out, prop, flag: with_value(d.get_granularity(), out),
            "cuMemAddressReserve": lambda out, size, align, addr, flags: with_value(d.reserve(size, align), out),
            "cuMemAddressFree": lambda address, size: d.free_address(address, size),
            "cuMemCreate": lambda out, size, prop, flags: with_value(d.create(size), out),
            "cuMemRelease": lambda handle: d.release(handle),
            "cuMemMap": lambda address, size, offset, handle, flags: d.map(address, size, offset, handle),
            "cuMemSetAccess": lambda address, size, desc, count: d.set_access(address, size),
            "cuMemUnmap": lambda address, size: d.unmap(address, size),
        }
        for name, body in bodies.items():
            setattr(self, name, _Function(body))


class _HostBytes(bytearray):
    """Host memory standing in for the device range; `keeper` rides along as in the real view."""

    keeper: object


def host_view(address: int, num_bytes: int, keeper: object, device: torch.device) -> torch.Tensor:
    """The fake's view: a CPU byte tensor whose storage holds `keeper`, as torch holds the real view's."""
    memory = _HostBytes(num_bytes)
    memory.keeper = keeper
    return torch.frombuffer(memory, dtype=torch.uint8)


def open_fake_driver(path: str, device: FakeDevice) -> _BindingsDriver | _CtypesDriver:
    if path == "bindings":
        return _BindingsDriver(0, cu=FakeBindings(device))
    if path == "ctypes":
        return _CtypesDriver(0, lib=FakeLibcuda(device))
    raise ValueError(path)


def fake_region(path: str, device: FakeDevice, num_pages: int) -> CudaRegion:
    """A real CudaRegion over the fake device, through the real `path` wrapper."""
    driver = open_fake_driver(path, device)
    return CudaRegion(num_pages * device.granularity, torch.device("cpu"), driver=driver, view=host_view)


def check_consistent(region: CudaRegion, device: FakeDevice) -> None:
    """The region's record is the driver's truth, and every handle ever created is accounted for."""
    reservation = region._reservation
    assert device.misuse == []
    mapped = {(address - reservation.base_address) // reservation.page_size: h for address, h in device.mapped.items()}
    assert reservation.mapped == mapped
    assert device.access == set(device.mapped), "a page is mapped without access, or access outlived a mapping"
    handles = list(reservation.mapped.values()) + reservation.spare
    assert len(handles) == len(set(handles)), "a handle is in two places"
    assert set(handles) == device.live, "a handle was lost or invented"
    assert reservation.num_created == device.num_created
    assert reservation.num_released == device.num_released
    assert device.num_created == len(reservation.mapped) + len(reservation.spare) + reservation.num_released
    assert set(device.ctx_stack) <= {CONTEXT}
