"""bench.py --quick, exactly as README documents it, runs end to end on the default model and its JSON holds every
expected row (timings are not checked); a bad --sections is a usage error."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
def test_bench_quick(tmp_path, smollm2_gguf):
    subprocess.run([sys.executable, ROOT / "bench.py", "--quick"], cwd=tmp_path, check=True, capture_output=True,
                   text=True, timeout=600)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["meta"]["cpu_capability"] and result["meta"]["dtype"] in ("float32", "bfloat16")
    rows = result["rows"]
    grid = set(itertools.product(["fwd", "fwd+bwd"], [1, 2], [1, 4], [16, 100]))   # mode, B, n, T of --quick
    scan = [row for row in rows if row["section"] == "scan"]
    assert {(row["mode"], row["B"], row["n"], row["T"]) for row in scan} == grid and len(scan) == len(grid)
    for row in scan:
        assert row["loop_ms"] > 0 and row["chunked_ms"] > 0 and row["rounds"] >= 3
        assert abs(row["speedup"] - row["loop_ms"] / row["chunked_ms"]) < 0.01 * row["speedup"] + 0.01
    chunk = [row for row in rows if row["section"] == "chunk_size"]
    assert {(row["mode"], row["B"], row["n"], row["T"], row["chunk_size"]) for row in chunk} == {
        (*key, C) for key in grid for C in (4, 16)}
    assert all(row["vs_best"] >= 1.0 for row in chunk)
    backbone = [row for row in rows if row["section"] == "backbone"]
    assert [row["what"] for row in backbone] == ["prefill", "decode"] and all(row["ours"] > 0 for row in backbone)
    by_section = {s: [row for row in rows if row["section"] == s] for s in ("prefill", "decode", "memory", "train")}
    assert all(len(by_section[s]) == 1 for s in ("prefill", "decode", "train"))
    assert all(row["overhead"] > 0 for row in by_section["prefill"] + by_section["decode"])
    assert by_section["train"][0]["speedup"] > 0 and by_section["train"][0]["chunked_tok_s"] > 0
    assert len(by_section["memory"]) == 2 * 2 * 3  # models × write modes × history lengths
    qwen_32k = next(r for r in by_section["memory"] if r["model"] == "Qwen3-4B" and r["write"] == "tsw/ssw"
                    and r["history"] == 32768)
    assert qwen_32k["state_bytes"] == 36 * 8 * 8 * 4 and qwen_32k["kv_cache_bytes"] == 2 * 36 * 8 * 128 * 32768 * 2


def test_bench_help_and_bad_sections(capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["-h"])
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out and "chunk_size" in out
    with pytest.raises(SystemExit) as e:
        bench.main(["--sections", "scan,bogus", "--out", str(tmp_path / "b.json")])
    assert e.value.code == 2
    assert "argument --sections: unknown section(s) bogus; choose from scan" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
