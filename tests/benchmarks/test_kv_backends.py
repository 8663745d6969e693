"""benchmarks/kv_backends.py end to end on a tiny random model (figures not checked, only their meaning)."""

from __future__ import annotations

from benchmarks import kv_backends
from tests.model.tiny_models import make_tiny_hf_model


def test_kv_backends_runs_every_backend_and_measures_waste(tmp_path, capsys) -> None:
    folder = make_tiny_hf_model(str(tmp_path), "llama")
    result = kv_backends.main(
        [
            "--model",
            folder,
            "--batches",
            "1,3",
            "--contexts",
            "20",
            "--decode-tokens",
            "4",
            "--max-model-len",
            "64",
            "--dtype",
            "float32",  # the byte counts below
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    assert [(p.backend, p.batch) for p in result.points] == [
        (backend, batch) for batch in (1, 3) for backend in ("paged", "virtual", "static")
    ]
    for point in result.points:
        assert point.prefill_tokens_per_s > 0 and point.decode_tokens_per_s > 0
        # Before the last step every request has the KV of 20 + 2 tokens cached (the
        # third generated token is sampled but not yet computed).
        assert point.used_bytes == point.batch * 22 * 2 * 2 * 2 * 16 * 4
    paged = result.point("paged", 3, 20)
    static = result.point("static", 3, 20)
    assert paged is not None and static is not None
    assert paged.waste == 1 - 22 / 32  # two 16-token blocks per request
    assert static.waste == 1 - 22 / 64  # a full 64-token row per request
    assert {(w.layout, w.page) for w in result.layouts} == {
        (layout, page) for layout in ("megacache", "per_layer") for page in ("4KiB", "2MiB")
    }
    assert (tmp_path / "out.json").exists()
    assert "decode vs paged" in capsys.readouterr().out
