"""The committed generated modules are exactly what the pinned generator makes from the .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.regenerate import ROOT, generate


def test_generated_modules_are_not_stale(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "the generator produced nothing"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python -m protos.regenerate"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale: run python -m protos.regenerate and commit the result"
        )
    committed_all = sorted((ROOT / "protos" / "zonewatch" / "v1").glob("*_pb2*.py*"))
    assert len(committed_all) == len(fresh), "a generated module has no .proto source any more"
