"""GPU virtual region on the CUDA driver's virtual memory API.

The range is reserved with cuMemAddressReserve and viewed as one torch tensor;
physical pages (cuMemCreate handles, 2 MiB on current GPUs) are mapped under
it with cuMemMap + cuMemSetAccess when committed and unmapped when released.
Unmapped handles go to a free list instead of back to the driver: cuMemCreate
is slow, and the page table never commits more pages than the memory budget,
so the pool stays within the budget.

The driver is reached through NVIDIA's `cuda.bindings.driver` when it is
installed, else through ctypes on libcuda; both sit behind `_Driver` so the
region reads the same either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import threading
from typing import Any, Protocol

import torch

_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
_CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class _Driver(Protocol):
    """The nine driver calls a region needs, with errors raised as RuntimeError."""

    def granularity(self) -> int: ...

    def make_current(self) -> None: ...

    def reserve(self, num_bytes: int, alignment: int) -> int: ...

    def free_address(self, address: int, num_bytes: int) -> None: ...

    def create(self, num_bytes: int) -> Any: ...

    def release_handle(self, handle: Any) -> None: ...

    def map(self, address: int, num_bytes: int, handle: Any) -> None: ...

    def unmap(self, address: int, num_bytes: int) -> None: ...


class _BindingsDriver:
    """`cuda.bindings.driver`: every call returns (CUresult, *values)."""

    def __init__(self, device_index: int) -> None:
        from cuda.bindings import driver

        self._cu = driver
        self._check(driver.cuInit(0))
        self._device = self._check(driver.cuDeviceGet(device_index))
        self._context = self._check(driver.cuDevicePrimaryCtxRetain(self._device))
        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        self._prop = prop
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device_index
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access

    def _check(self, result: tuple[Any, ...]) -> Any:
        error = result[0]
        if error != self._cu.CUresult.CUDA_SUCCESS:
            _, name = self._cu.cuGetErrorName(error)
            raise RuntimeError(f"CUDA driver call failed: {name.decode() if name else error}")
        return result[1] if len(result) == 2 else None

    def granularity(self) -> int:
        flag = self._cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        return int(self._check(self._cu.cuMemGetAllocationGranularity(self._prop, flag)))

    def make_current(self) -> None:
        self._check(self._cu.cuCtxSetCurrent(self._context))

    def reserve(self, num_bytes: int, alignment: int) -> int:
        return int(self._check(self._cu.cuMemAddressReserve(num_bytes, alignment, 0, 0)))

    def free_address(self, address: int, num_bytes: int) -> None:
        self._check(self._cu.cuMemAddressFree(address, num_bytes))

    def create(self, num_bytes: int) -> Any:
        return self._check(self._cu.cuMemCreate(num_bytes, self._prop, 0))

    def release_handle(self, handle: Any) -> None:
        self._check(self._cu.cuMemRelease(handle))

    def map(self, address: int, num_bytes: int, handle: Any) -> None:
        self._check(self._cu.cuMemMap(address, num_bytes, 0, handle, 0))
        self._check(self._cu.cuMemSetAccess(address, num_bytes, [self._access], 1))

    def unmap(self, address: int, num_bytes: int) -> None:
        self._check(self._cu.cuMemUnmap(address, num_bytes))


class _CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _CUmemAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _CUmemAllocFlags),
    ]


class _CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", _CUmemLocation), ("flags", ctypes.c_int)]


class _CtypesDriver:
    """libcuda through ctypes, with the struct layouts of cuda.h (CUDA 11.2+)."""

    def __init__(self, device_index: int) -> None:
        path = ctypes.util.find_library("cuda") or "libcuda.so.1"
        self._lib = ctypes.CDLL(path)
        u64 = ctypes.c_ulonglong
        size = ctypes.c_size_t
        signatures: dict[str, list[Any]] = {
            "cuInit": [ctypes.c_uint],
            "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
            "cuCtxSetCurrent": [ctypes.c_void_p],
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
            "cuMemGetAllocationGranularity": [
                ctypes.POINTER(size),
                ctypes.POINTER(_CUmemAllocationProp),
                ctypes.c_int,
            ],
            "cuMemAddressReserve": [ctypes.POINTER(u64), size, size, u64, u64],
            "cuMemAddressFree": [u64, size],
            "cuMemCreate": [ctypes.POINTER(u64), size, ctypes.POINTER(_CUmemAllocationProp), u64],
            "cuMemRelease": [u64],
            "cuMemMap": [u64, size, size, u64, u64],
            "cuMemSetAccess": [u64, size, ctypes.POINTER(_CUmemAccessDesc), size],
            "cuMemUnmap": [u64, size],
        }
        for name, argtypes in signatures.items():
            function = getattr(self._lib, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
        self._check(self._lib.cuInit(0))
        device = ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(device), device_index))
        self._context = ctypes.c_void_p()
        self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._context), device.value))
        self._prop = _CUmemAllocationProp()
        self._prop.type = _CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location = _CUmemLocation(_CU_MEM_LOCATION_TYPE_DEVICE, device.value)
        self._access = _CUmemAccessDesc(
            _CUmemLocation(_CU_MEM_LOCATION_TYPE_DEVICE, device.value), _CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        )

    def _check(self, error: int) -> None:
        if error != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(error, ctypes.byref(name))
            raise RuntimeError(f"CUDA driver call failed: {name.value.decode() if name.value else error}")

    def granularity(self) -> int:
        value = ctypes.c_size_t()
        self._check(
            self._lib.cuMemGetAllocationGranularity(
                ctypes.byref(value), ctypes.byref(self._prop), _CU_MEM_ALLOC_GRANULARITY_MINIMUM
            )
        )
        return value.value

    def make_current(self) -> None:
        self._check(self._lib.cuCtxSetCurrent(self._context))

    def reserve(self, num_bytes: int, alignment: int) -> int:
        address = ctypes.c_ulonglong()
        self._check(self._lib.cuMemAddressReserve(ctypes.byref(address), num_bytes, alignment, 0, 0))
        return address.value

    def free_address(self, address: int, num_bytes: int) -> None:
        self._check(self._lib.cuMemAddressFree(address, num_bytes))

    def create(self, num_bytes: int) -> int:
        handle = ctypes.c_ulonglong()
        self._check(self._lib.cuMemCreate(ctypes.byref(handle), num_bytes, ctypes.byref(self._prop), 0))
        return handle.value

    def release_handle(self, handle: int) -> None:
        self._check(self._lib.cuMemRelease(handle))

    def map(self, address: int, num_bytes: int, handle: int) -> None:
        self._check(self._lib.cuMemMap(address, num_bytes, 0, handle, 0))
        self._check(self._lib.cuMemSetAccess(address, num_bytes, ctypes.byref(self._access), 1))

    def unmap(self, address: int, num_bytes: int) -> None:
        self._check(self._lib.cuMemUnmap(address, num_bytes))


def _open_driver(device_index: int) -> _Driver:
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        return _BindingsDriver(device_index)
    return _CtypesDriver(device_index)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_page_size(device: torch.device) -> int:
    """The driver's minimum mapping granularity for `device` (2 MiB on current GPUs)."""
    torch.cuda.init()
    return _open_driver(_device_index(device)).granularity()


class _CudaArray:
    """Just enough of __cuda_array_interface__ (v3) for torch to view raw device bytes."""

    def __init__(self, address: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


class CudaRegion:
    """A reserved device address range whose pages are cuMemCreate handles mapped on demand.

    Commit and release may run on the page table's background thread, so each
    call makes the device's primary context current first and the handle pool
    is guarded by a lock.
    """

    def __init__(self, num_bytes: int, device: torch.device) -> None:
        if num_bytes <= 0:
            raise ValueError(f"num_bytes must be > 0, got {num_bytes}")
        if device.type != "cuda":
            raise ValueError(f"CudaRegion needs a cuda device, got {device}")
        self.device = torch.device("cuda", _device_index(device))
        torch.cuda.init()
        self._driver = _open_driver(self.device.index)
        self._driver.make_current()
        self.page_size = self._driver.granularity()
        self.num_pages = -(-num_bytes // self.page_size)
        self._num_bytes = self.num_pages * self.page_size
        self.base_address = self._driver.reserve(self._num_bytes, self.page_size)
        self._lock = threading.Lock()
        self._mapped: dict[int, Any] = {}
        self._spare_handles: list[Any] = []
        self._closed = False
        self._bytes = self._wrap()

    def _wrap(self) -> torch.Tensor:
        """View the range as a uint8 tensor on this device.

        torch asks the driver which device owns the pointer, which fails on an
        unmapped address, so one page is mapped while the view is made.
        """
        self.commit(0, 1)
        with torch.cuda.device(self.device):
            view = torch.as_tensor(_CudaArray(self.base_address, self._num_bytes), device=self.device)
        self.release(0, 1)
        if view.data_ptr() != self.base_address or view.device != self.device:
            raise RuntimeError("torch placed the region's view at another address or device")
        return view

    @property
    def num_physical_pages(self) -> int:
        """Handles alive (mapped or spare): the device memory this region really holds."""
        return len(self._mapped) + len(self._spare_handles)

    def as_bytes(self) -> torch.Tensor:
        return self._bytes

    def commit(self, first_page: int, num_pages: int) -> None:
        self._check_range(first_page, num_pages)
        with self._lock:
            self._driver.make_current()
            for page in range(first_page, first_page + num_pages):
                if page in self._mapped:
                    raise RuntimeError(f"page {page} committed twice")
                handle = self._spare_handles.pop() if self._spare_handles else self._driver.create(self.page_size)
                self._driver.map(self.base_address + page * self.page_size, self.page_size, handle)
                self._mapped[page] = handle

    def release(self, first_page: int, num_pages: int) -> None:
        self._check_range(first_page, num_pages)
        # Kernels already queued may still read these pages; unmapping under
        # them would fault, and release is rare (pressure), so wait for them.
        torch.cuda.synchronize(self.device)
        with self._lock:
            self._driver.make_current()
            for page in range(first_page, first_page + num_pages):
                handle = self._mapped.pop(page)
                self._driver.unmap(self.base_address + page * self.page_size, self.page_size)
                self._spare_handles.append(handle)

    def is_mapped(self, page: int) -> bool:
        return page in self._mapped

    def close(self) -> None:
        """Unmap everything, free the handles and the address range. Safe to call twice."""
        if self._closed:
            return
        torch.cuda.synchronize(self.device)
        with self._lock:
            self._driver.make_current()
            for page, handle in sorted(self._mapped.items()):
                self._driver.unmap(self.base_address + page * self.page_size, self.page_size)
                self._spare_handles.append(handle)
            self._mapped.clear()
            for handle in self._spare_handles:
                self._driver.release_handle(handle)
            self._spare_handles.clear()
            self._driver.free_address(self.base_address, self._num_bytes)
            self._closed = True

    def _check_range(self, first_page: int, num_pages: int) -> None:
        # Raised, not asserted: under `python -O` a bad index would unmap memory that is not ours.
        if self._closed:
            raise RuntimeError("region is closed")
        if not (0 <= first_page and num_pages >= 0 and first_page + num_pages <= self.num_pages):
            raise IndexError(f"pages [{first_page}, {first_page + num_pages}) outside region of {self.num_pages}")
