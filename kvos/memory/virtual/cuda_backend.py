"""GPU virtual region on the CUDA driver's virtual memory API.

The range is reserved with cuMemAddressReserve and viewed as one torch tensor;
physical pages (cuMemCreate handles, 2 MiB on current GPUs) are mapped under
it with cuMemMap + cuMemSetAccess when committed and unmapped when released.

    handles:  created --map--> mapped at a page --unmap--> spare --trim/close--> released
                                  ^________________ commit ______|

Every handle is in exactly one of three places: mapped at a page, spare (kept
for reuse: cuMemCreate is slow and a released page is usually wanted again
at once by the commit that reclaimed it), or released to the driver. The page
table never maps more pages than the budget (within a step that swaps rows
out, their pages are kept too, until the manager unmaps the overshoot and
trims at the step's end) and a handle is created only when no spare one is
left, so between steps mapped + spare never exceeds the budget. Spare
handles go back to the device on `trim()` (the manager's
`release_idle_pages()`) and on close.

Ownership: the region's view tensor, and every view of it, keeps the
reservation alive through the tensor's storage (torch holds the object whose
`__cuda_array_interface__` it wrapped until the storage dies). close() marks
the region closed; the pages, handles and address range are given back when
the last view is gone, at once if none is left, so a view can never point at
freed or reused memory.

The driver is reached through NVIDIA's `cuda.bindings.driver` when it is
installed and initialises, else through ctypes on libcuda.so.1; both sit
behind `_Driver` so the region reads the same either way, and tests put a fake
library under either one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from kvos.memory.virtual.region import DeviceOutOfMemory, PageRun, RegionBroken, RegionError, check_runs

logger = logging.getLogger(__name__)

_CUDA_ERROR_OUT_OF_MEMORY = 2
_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
_CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class CudaDriverError(RegionError):
    """A CUDA driver call failed for a reason other than memory."""

    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.call = call
        self.code = code


def _raise(call: str, code: int, name: str) -> None:
    if code == _CUDA_ERROR_OUT_OF_MEMORY:
        raise DeviceOutOfMemory(f"{call} failed: {name}")
    raise CudaDriverError(call, code, name)


class _Driver(Protocol):
    """The driver calls a region needs, each raising DeviceOutOfMemory or CudaDriverError."""

    name: str
    """Which path loaded: "cuda.bindings" or "ctypes (<library>)"."""

    def version(self) -> int: ...

    def granularity(self) -> int: ...

    def push(self) -> None:
        """Make the device's primary context current on this thread, above whatever was."""
        ...

    def pop(self) -> None: ...

    def synchronize(self) -> None:
        """Wait for all work queued in the current context."""
        ...

    def reserve(self, num_bytes: int, alignment: int) -> int: ...

    def free_address(self, address: int, num_bytes: int) -> None: ...

    def create(self, num_bytes: int) -> Any: ...

    def release_handle(self, handle: Any) -> None: ...

    def map(self, address: int, num_bytes: int, handle: Any) -> None: ...

    def set_access(self, address: int, num_bytes: int) -> None: ...

    def unmap(self, address: int, num_bytes: int) -> None: ...

    def close(self) -> None:
        """Release the primary context retained when the driver was opened. Safe to call twice."""
        ...


class _BindingsDriver:
    """`cuda.bindings.driver`: every call returns (CUresult, *values)."""

    name = "cuda.bindings"

    def __init__(self, device_index: int, cu: Any = None) -> None:
        if cu is None:
            from cuda.bindings import driver

            cu = driver
        self._cu = cu
        self._check("cuInit", cu.cuInit(0))
        self._device = self._check("cuDeviceGet", cu.cuDeviceGet(device_index))
        self._context = self._check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._device))
        self._retained = True
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        self._prop = prop
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device_index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access

    def _check(self, call: str, result: tuple[Any, ...]) -> Any:
        error = result[0]
        if error != self._cu.CUresult.CUDA_SUCCESS:
            code = int(getattr(error, "value", error))
            _, name = self._cu.cuGetErrorName(error)
            _raise(call, code, name.decode() if name else "unknown error")
        return result[1] if len(result) == 2 else None

    def version(self) -> int:
        return int(self._check("cuDriverGetVersion", self._cu.cuDriverGetVersion()))

    def granularity(self) -> int:
        flag = self._cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        return int(
            self._check("cuMemGetAllocationGranularity", self._cu.cuMemGetAllocationGranularity(self._prop, flag))
        )

    def push(self) -> None:
        self._check("cuCtxPushCurrent", self._cu.cuCtxPushCurrent(self._context))

    def pop(self) -> None:
        self._check("cuCtxPopCurrent", self._cu.cuCtxPopCurrent())

    def synchronize(self) -> None:
        self._check("cuCtxSynchronize", self._cu.cuCtxSynchronize())

    def reserve(self, num_bytes: int, alignment: int) -> int:
        return int(self._check("cuMemAddressReserve", self._cu.cuMemAddressReserve(num_bytes, alignment, 0, 0)))

    def free_address(self, address: int, num_bytes: int) -> None:
        self._check("cuMemAddressFree", self._cu.cuMemAddressFree(address, num_bytes))

    def create(self, num_bytes: int) -> Any:
        return self._check("cuMemCreate", self._cu.cuMemCreate(num_bytes, self._prop, 0))

    def release_handle(self, handle: Any) -> None:
        self._check("cuMemRelease", self._cu.cuMemRelease(handle))

    def map(self, address: int, num_bytes: int, handle: Any) -> None:
        self._check("cuMemMap", self._cu.cuMemMap(address, num_bytes, 0, handle, 0))

    def set_access(self, address: int, num_bytes: int) -> None:
        self._check("cuMemSetAccess", self._cu.cuMemSetAccess(address, num_bytes, [self._access], 1))

    def unmap(self, address: int, num_bytes: int) -> None:
        self._check("cuMemUnmap", self._cu.cuMemUnmap(address, num_bytes))

    def close(self) -> None:
        if self._retained:
            self._check("cuDevicePrimaryCtxRelease", self._cu.cuDevicePrimaryCtxRelease(self._device))
            self._retained = False


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


_U64 = ctypes.c_ulonglong
_SIZE = ctypes.c_size_t
# Symbol names as cuda.h binds them: where it #defines `cuX` to `cuX_v2`, the
# unversioned symbol is the old ABI kept for old binaries, so the _v2 one is named.
_CTYPES_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuDriverGetVersion": [ctypes.POINTER(ctypes.c_int)],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
    "cuCtxPushCurrent_v2": [ctypes.c_void_p],
    "cuCtxPopCurrent_v2": [ctypes.POINTER(ctypes.c_void_p)],
    "cuCtxSynchronize": [],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuMemGetAllocationGranularity": [ctypes.POINTER(_SIZE), ctypes.POINTER(_CUmemAllocationProp), ctypes.c_int],
    "cuMemAddressReserve": [ctypes.POINTER(_U64), _SIZE, _SIZE, _U64, _U64],
    "cuMemAddressFree": [_U64, _SIZE],
    "cuMemCreate": [ctypes.POINTER(_U64), _SIZE, ctypes.POINTER(_CUmemAllocationProp), _U64],
    "cuMemRelease": [_U64],
    "cuMemMap": [_U64, _SIZE, _SIZE, _U64, _U64],
    "cuMemSetAccess": [_U64, _SIZE, ctypes.POINTER(_CUmemAccessDesc), _SIZE],
    "cuMemUnmap": [_U64, _SIZE],
}


def _load_libcuda() -> tuple[Any, str]:
    """The driver library: libcuda.so.1 first, since find_library may name a toolkit's link-time stub."""
    try:
        return ctypes.CDLL("libcuda.so.1"), "libcuda.so.1"
    except OSError:
        path = ctypes.util.find_library("cuda")
        if path is None:
            raise
        return ctypes.CDLL(path), path


class _CtypesDriver:
    """libcuda through ctypes, with the struct layouts of cuda.h (CUDA 11.2+)."""

    def __init__(self, device_index: int, lib: Any = None) -> None:
        if lib is None:
            lib, path = _load_libcuda()
        else:
            path = type(lib).__name__
        self.name = f"ctypes ({path})"
        self._lib = lib
        for symbol, argtypes in _CTYPES_SIGNATURES.items():
            function = getattr(lib, symbol)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
        self._check("cuInit", lib.cuInit(0))
        device = ctypes.c_int()
        self._check("cuDeviceGet", lib.cuDeviceGet(ctypes.pointer(device), device_index))
        self._device = device.value
        self._context = ctypes.c_void_p()
        self._check(
            "cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.pointer(self._context), self._device)
        )
        self._retained = True
        self._prop = _CUmemAllocationProp()
        self._prop.type = _CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location = _CUmemLocation(_CU_MEM_LOCATION_TYPE_DEVICE, self._device)
        self._access = _CUmemAccessDesc(
            _CUmemLocation(_CU_MEM_LOCATION_TYPE_DEVICE, self._device), _CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        )

    def _check(self, call: str, error: int) -> None:
        if error != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(error, ctypes.pointer(name))
            _raise(call, error, name.value.decode() if name.value else "unknown error")

    def version(self) -> int:
        value = ctypes.c_int()
        self._check("cuDriverGetVersion", self._lib.cuDriverGetVersion(ctypes.pointer(value)))
        return value.value

    def granularity(self) -> int:
        value = _SIZE()
        self._check(
            "cuMemGetAllocationGranularity",
            self._lib.cuMemGetAllocationGranularity(
                ctypes.pointer(value), ctypes.pointer(self._prop), _CU_MEM_ALLOC_GRANULARITY_MINIMUM
            ),
        )
        return value.value

    def push(self) -> None:
        self._check("cuCtxPushCurrent", self._lib.cuCtxPushCurrent_v2(self._context))

    def pop(self) -> None:
        popped = ctypes.c_void_p()
        self._check("cuCtxPopCurrent", self._lib.cuCtxPopCurrent_v2(ctypes.pointer(popped)))

    def synchronize(self) -> None:
        self._check("cuCtxSynchronize", self._lib.cuCtxSynchronize())

    def reserve(self, num_bytes: int, alignment: int) -> int:
        address = _U64()
        self._check(
            "cuMemAddressReserve", self._lib.cuMemAddressReserve(ctypes.pointer(address), num_bytes, alignment, 0, 0)
        )
        return address.value

    def free_address(self, address: int, num_bytes: int) -> None:
        self._check("cuMemAddressFree", self._lib.cuMemAddressFree(address, num_bytes))

    def create(self, num_bytes: int) -> int:
        handle = _U64()
        self._check(
            "cuMemCreate", self._lib.cuMemCreate(ctypes.pointer(handle), num_bytes, ctypes.pointer(self._prop), 0)
        )
        return handle.value

    def release_handle(self, handle: int) -> None:
        self._check("cuMemRelease", self._lib.cuMemRelease(handle))

    def map(self, address: int, num_bytes: int, handle: int) -> None:
        self._check("cuMemMap", self._lib.cuMemMap(address, num_bytes, 0, handle, 0))

    def set_access(self, address: int, num_bytes: int) -> None:
        self._check("cuMemSetAccess", self._lib.cuMemSetAccess(address, num_bytes, ctypes.pointer(self._access), 1))

    def unmap(self, address: int, num_bytes: int) -> None:
        self._check("cuMemUnmap", self._lib.cuMemUnmap(address, num_bytes))

    def close(self) -> None:
        if self._retained:
            self._check("cuDevicePrimaryCtxRelease", self._lib.cuDevicePrimaryCtxRelease_v2(self._device))
            self._retained = False


DRIVERS: tuple[Callable[[int], _Driver], ...] = (_BindingsDriver, _CtypesDriver)
"""Driver paths in the order they are tried (tests narrow it to one)."""


def open_driver(device_index: int) -> _Driver:
    """The first driver path that loads and initialises; a broken cuda.bindings falls back to ctypes."""
    failures = []
    for make in DRIVERS:
        try:
            driver = make(device_index)
        except Exception as exc:  # an import, a missing library or a failing cuInit: try the next path
            failures.append(f"{getattr(make, '__name__', make)}: {exc}")
            continue
        if failures:
            logger.info("CUDA driver through %s (%s)", driver.name, "; ".join(failures))
        return driver
    raise RegionError("no CUDA driver path could be opened: " + "; ".join(failures))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_page_size(device: torch.device) -> int:
    """The driver's minimum mapping granularity for `device` (2 MiB on current GPUs)."""
    torch.cuda.init()
    driver = open_driver(_device_index(device))
    try:
        return driver.granularity()
    finally:
        driver.close()


class _CudaArray:
    """Just enough of __cuda_array_interface__ (v3) for torch to view raw device bytes.

    torch keeps this object until the view's storage dies; `keeper` rides
    along so the reservation outlives every view.
    """

    def __init__(self, address: int, num_bytes: int, keeper: object) -> None:
        self.keeper = keeper
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


ViewFn = Callable[[int, int, object, torch.device], torch.Tensor]
"""(address, bytes, keeper, device) -> a uint8 tensor over the range whose storage holds `keeper`."""


def _device_view(address: int, num_bytes: int, keeper: object, device: torch.device) -> torch.Tensor:
    with torch.cuda.device(device):
        view = torch.as_tensor(_CudaArray(address, num_bytes, keeper), device=device)
    if view.data_ptr() != address or view.device != device:
        raise RegionError("torch placed the region's view at another address or device")
    return view


class _Keeper:
    """What every view holds: when the last reference goes, the reservation is freed."""


class _Reservation:
    """One reserved range and the physical pages under it: the region's driver-side state.

    `num_created == len(mapped) + len(spare) + num_released` always holds, and
    `mapped` is exactly what the driver has mapped, after any failure too.
    """

    def __init__(self, driver: _Driver, num_bytes: int) -> None:
        self.driver = driver
        self.lock = threading.Lock()
        self.mapped: dict[int, Any] = {}
        self.spare: list[Any] = []
        self.num_created = 0
        self.num_released = 0
        self.broken: str | None = None
        self.address_freed = False
        self.driver_closed = False
        self.closing = False
        """Set while close() drops its references: the finalizer then leaves freeing to close()."""
        try:
            with self._current():
                self.page_size = driver.granularity()
                self.num_pages = -(-num_bytes // self.page_size)
                self.num_bytes = self.num_pages * self.page_size
                self.base_address = driver.reserve(self.num_bytes, self.page_size)
        except BaseException:
            driver.close()
            raise

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        """The primary context, pushed over the thread's own (the engine's, or none on the mapper thread)."""
        self.driver.push()
        try:
            yield
        finally:
            try:
                self.driver.pop()
            except RegionError:
                # The work inside succeeded or raises its own error; the context
                # left current is the primary one torch uses anyway.
                logger.warning("could not pop the CUDA context", exc_info=True)

    def _address(self, page: int) -> int:
        return self.base_address + page * self.page_size

    def _check_usable(self) -> None:
        if self.address_freed:
            raise RegionError("region is closed")
        if self.broken is not None:
            raise RegionBroken(self.broken)

    def _break(self, reason: str) -> None:
        logger.error("CUDA region broken: %s", reason)
        if self.broken is None:
            self.broken = reason

    def commit(self, pages: list[int]) -> None:
        """Map a handle (spare first, else new) at every page, or undo them all and raise."""
        with self.lock:
            self._check_usable()
            taken = [page for page in pages if page in self.mapped]
            if taken:
                raise RegionError(f"pages {taken} committed twice")
            with self._current():
                done: list[int] = []
                try:
                    for page in pages:
                        handle = self.spare.pop() if self.spare else self._create()
                        try:
                            self._map(page, handle)
                        except BaseException:
                            if page not in self.mapped:
                                self.spare.append(handle)
                            raise
                        self.mapped[page] = handle
                        done.append(page)
                except BaseException:
                    self._undo_commit(done)
                    raise

    def _create(self) -> Any:
        handle = self.driver.create(self.page_size)
        self.num_created += 1
        return handle

    def _map(self, page: int, handle: Any) -> None:
        """Map `handle` at `page` with read-write access, or leave the page unmapped and raise."""
        address = self._address(page)
        self.driver.map(address, self.page_size, handle)
        try:
            self.driver.set_access(address, self.page_size)
        except BaseException:
            try:
                self.driver.unmap(address, self.page_size)
            except RegionError:
                self.mapped[page] = handle  # the driver's truth: mapped, without access
                self._break(f"page {page} stays mapped without access: cuMemUnmap failed after cuMemSetAccess did")
            raise

    def _undo_commit(self, pages: list[int]) -> None:
        for page in reversed(pages):
            try:
                self.driver.unmap(self._address(page), self.page_size)
            except RegionError:
                self._break(f"page {page} stays mapped: undoing a failed commit could not unmap it")
                continue
            self.spare.append(self.mapped.pop(page))

    def release(self, pages: list[int]) -> None:
        """Unmap every page into the spare pool once queued kernels are done, or re-map them all and raise."""
        with self.lock:
            self._check_usable()
            missing = [page for page in pages if page not in self.mapped]
            if missing:
                raise RegionError(f"pages {missing} released but not committed")
            with self._current():
                # Kernels already queued may still read these pages; unmapping under
                # them would fault, and release is rare (pressure), so wait for them.
                self.driver.synchronize()
                num_done = 0
                try:
                    for page in pages:
                        self.driver.unmap(self._address(page), self.page_size)
                        self.spare.append(self.mapped.pop(page))
                        num_done += 1
                except BaseException:
                    self._undo_release(pages[:num_done])
                    raise

    def _undo_release(self, pages: list[int]) -> None:
        # The handles these pages had are the last ones pushed to the pool, in order.
        for page in reversed(pages):
            handle = self.spare.pop()
            try:
                self._map(page, handle)
            except RegionError:
                if page not in self.mapped:
                    self.spare.append(handle)
                self._break(f"page {page} stays unmapped: undoing a failed release could not map it again")
                continue
            self.mapped[page] = handle

    def trim(self) -> int:
        """Release every spare handle to the driver; on a failure the rest stay spare."""
        with self.lock:
            if not self.spare:
                return 0
            num_released = 0
            with self._current():
                while self.spare:
                    self.driver.release_handle(self.spare[-1])
                    self.spare.pop()
                    self.num_released += 1
                    num_released += 1
            return num_released

    @property
    def freed(self) -> bool:
        return self.driver_closed

    def free(self) -> None:
        """Unmap every page, release every handle, free the range and the context.

        Goes on past failures and keeps whatever could not be freed, so a
        second call retries it; raises RegionError naming what is left.
        """
        with self.lock:
            if self.driver_closed:
                return
            errors: list[RegionError] = []
            try:
                with self._current():
                    try:
                        self.driver.synchronize()
                    except RegionError as exc:  # go on: a dead context has no kernels left to wait for
                        errors.append(exc)
                    for page in sorted(self.mapped):
                        try:
                            self.driver.unmap(self._address(page), self.page_size)
                        except RegionError as exc:
                            errors.append(exc)
                            continue
                        self.spare.append(self.mapped.pop(page))
                    kept = []
                    for handle in self.spare:
                        try:
                            self.driver.release_handle(handle)
                        except RegionError as exc:
                            errors.append(exc)
                            kept.append(handle)
                            continue
                        self.num_released += 1
                    self.spare = kept
                    if not self.mapped and not self.address_freed:
                        try:
                            self.driver.free_address(self.base_address, self.num_bytes)
                            self.address_freed = True
                        except RegionError as exc:
                            errors.append(exc)
            except RegionError as exc:
                errors.append(exc)
            if errors:
                raise RegionError(
                    f"could not free the CUDA region: {len(self.mapped)} pages still mapped, "
                    f"{len(self.spare)} handles kept, address range {'freed' if self.address_freed else 'kept'}; "
                    f"first error: {errors[0]}"
                ) from errors[0]
            self.driver_closed = True
            try:
                self.driver.close()
            except RegionError:
                logger.warning("could not release the CUDA primary context", exc_info=True)


def _free_logging_errors(reservation: _Reservation) -> None:
    """The finalizer's body: it may run inside a tensor's deleter, where nothing can be raised.

    While close() drops the region's own references it frees (and raises) itself.
    """
    if reservation.closing:
        return
    try:
        reservation.free()
    except Exception:
        logger.exception("freeing a dropped CUDA region failed")


class CudaRegion:
    """A reserved device address range whose pages are cuMemCreate handles mapped on demand.

    Commit and release may run on the page table's background thread, so each
    call pushes the device's primary context and the handle pool is guarded by
    a lock. `driver` and `view` let tests put a fake driver and host memory
    under the real region; the engine passes neither.
    """

    def __init__(
        self, num_bytes: int, device: torch.device, driver: _Driver | None = None, view: ViewFn | None = None
    ) -> None:
        if num_bytes <= 0:
            raise ValueError(f"num_bytes must be > 0, got {num_bytes}")
        if driver is None:
            if device.type != "cuda":
                raise ValueError(f"CudaRegion needs a cuda device, got {device}")
            device = torch.device("cuda", _device_index(device))
            torch.cuda.init()
            driver = open_driver(device.index)
            view = view or _device_view
        elif view is None:
            raise ValueError("a region on an injected driver needs a view of the memory that driver stands for")
        self.device = device
        self.driver_name = driver.name
        self._reservation = _Reservation(driver, num_bytes)
        self.page_size = self._reservation.page_size
        self.num_pages = self._reservation.num_pages
        self.base_address = self._reservation.base_address
        self._closed = False
        self._token: _Keeper | None = _Keeper()
        self._finalizer = weakref.finalize(self._token, _free_logging_errors, self._reservation)
        # At interpreter exit the process gives everything back; calling the
        # driver while torch and libcuda are being torn down is not worth the risk.
        self._finalizer.atexit = False
        try:
            self._bytes: torch.Tensor | None = self._wrap(view)
        except BaseException:
            self._token = None
            self._finalizer()
            raise

    def _wrap(self, view: ViewFn) -> torch.Tensor:
        """View the range as a uint8 tensor; the spare handle this leaves is released at once.

        torch asks the driver which device owns the pointer, which fails on an
        unmapped address, so one page is mapped while the view is made.
        """
        self._reservation.commit([0])
        try:
            tensor = view(self.base_address, self._reservation.num_bytes, self._token, self.device)
        finally:
            self._reservation.release([0])
        self._reservation.trim()
        return tensor

    @property
    def num_physical_pages(self) -> int:
        """Handles alive (mapped or spare): the device memory this region really holds."""
        reservation = self._reservation
        return len(reservation.mapped) + len(reservation.spare)

    @property
    def num_mapped_pages(self) -> int:
        return len(self._reservation.mapped)

    @property
    def is_freed(self) -> bool:
        """Whether every page, handle and the address range have gone back to the device."""
        return self._reservation.freed

    def is_mapped(self, page: int) -> bool:
        return page in self._reservation.mapped

    def as_bytes(self) -> torch.Tensor:
        if self._bytes is None:
            raise RegionError("region is closed")
        return self._bytes

    def commit(self, runs: Sequence[PageRun]) -> None:
        self._reservation.commit(self._pages(runs))

    def release(self, runs: Sequence[PageRun]) -> None:
        self._reservation.release(self._pages(runs))

    def trim(self) -> int:
        """Give every spare handle back to the device (cuMemRelease); returns how many."""
        return self._reservation.trim()

    def make_room(self) -> None:
        """Return the blocks torch's caching allocator holds unused, so cuMemCreate can have them."""
        if self.device.type == "cuda":  # a fake driver (tests) stands for the device with host memory
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Refuse further commits; give every page, handle and the range back once no view is left.

        With no view alive (the worker's buffer closed or dropped) that is
        now; otherwise when the last view dies. Safe to call twice; a second
        call retries whatever a failed first one could not free, and raises
        RegionError if it still cannot.
        """
        if not self._closed:
            self._closed = True
            self._reservation.closing = True
            self._bytes = None
            self._token = None  # the views' storages hold the other references
            self._reservation.closing = False
        if self._finalizer.alive:
            logger.info("CUDA region closed while views of it are alive: its memory goes with the last one")
            return
        self._reservation.free()

    def _pages(self, runs: Sequence[PageRun]) -> list[int]:
        if self._closed:
            raise RegionError("region is closed")
        return check_runs(runs, self.num_pages)
