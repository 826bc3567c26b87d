"""Atomic writes and provenance."""

import os

from icl_heads.io import atomic_write_text, environment, read_json, write_json, write_provenance


def test_atomic_write_leaves_no_temp_file_and_normal_permissions(tmp_path):
    write_json(tmp_path / "a" / "r.json", {"x": 1})
    atomic_write_text(tmp_path / "a" / "r.json", '{"x": 2}')
    assert read_json(tmp_path / "a" / "r.json") == {"x": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a" / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_provenance_has_config_seed_versions_and_commit(tmp_path):
    from icl_heads.config import get_preset

    write_provenance(tmp_path, get_preset("smoke"), 7, extra="x")
    prov = read_json(tmp_path / "config.json")
    assert prov["seed"] == 7 and prov["config"]["task"]["d"] == 5 and prov["extra"] == "x"
    env = environment()
    assert set(prov["environment"]) == set(env)
    assert prov["environment"]["packages"]["torch"] == env["packages"]["torch"] is not None
    assert "git_commit" in prov["environment"]


def test_keep_freed_memory_reaches_glibc_and_spawned_children():
    """The CLI's malloc setting (workers.keep_freed_memory): mallopt accepts it and a spawned child sees it."""
    import subprocess
    import sys

    code = ("import os, subprocess, sys; from icl_heads.workers import keep_freed_memory; print(keep_freed_memory()); "
            "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"MALLOC_MMAP_MAX_\"))'], "
            "capture_output=True, text=True).stdout.strip())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["True", "0"]
