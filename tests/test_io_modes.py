"""Artifacts respect the umask: every file of a saved adapter, a checkpoint and a merged model gets
the mode an ordinary file gets (safetensors' writer creates 0600 files; temp files are private)."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import tiny_overrides
from peftlab.configure import load_config
from peftlab.export.merge import export_merged
from peftlab.train.loop import train


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_every_artifact_file_respects_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        cfg = load_config(None, [*tiny_overrides("gpt2"), "train.progress=false", "train.mixed_precision=no",
                                 "train.threads=1", "data.path=builtin:tasks", "data.eval_split=0",
                                 "train.steps=2", "train.save_every=1", "train.save_total_limit=5",
                                 f"train.output_dir={run}"])
        result = train(cfg)
        export_merged(tmp_path / "merged", run=run, verify=False)
    finally:
        os.umask(old)
    checkpoints = [p for p in run.rglob("*") if "checkpoint" in str(p.relative_to(run))]
    roots = {"adapter": list(result.artifact.rglob("*")), "checkpoints": checkpoints,
             "merged model": list((tmp_path / "merged").rglob("*"))}
    seen = set()
    for what, paths in roots.items():
        files = [p for p in paths if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), (what, files)
        for p in paths:
            mode = stat.S_IMODE(p.stat().st_mode)
            want = dir_mode if p.is_dir() else file_mode
            assert mode == want, f"{what}: {p.relative_to(tmp_path)} has mode {oct(mode)}, want {oct(want)}"
            seen.add(p.suffix)
    assert {".safetensors", ".json"} <= seen
