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


class _Stop(Exception):
    pass


def test_sigterm_while_a_checkpoint_is_written_waits_until_the_folder_is_whole(tmp_path, monkeypatch):
    """A SIGTERM after the weights but before ``meta.json`` used to leave new weights beside the old meta
    (the rerun stopped on "checksum mismatch", seen on CI). Now it is delivered once the folder is whole."""
    import signal

    import torch

    from icl_heads import io as io_module
    from icl_heads.checkpoint import load_model, save_checkpoint
    from icl_heads.config import ModelConfig
    from icl_heads.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_dims=3, n_max=5, d_model=8, n_layers=1, n_heads=2))
    save_checkpoint(tmp_path, model, {"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_write, written = io_module.atomic_write_bytes, []

    def write_then_sigterm(path, data):
        out = real_write(path, data)
        written.append(out.name)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives after each file, the first one included
        return out

    def stop(signum, frame):
        raise _Stop()

    monkeypatch.setattr(io_module, "atomic_write_bytes", write_then_sigterm)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        try:
            save_checkpoint(tmp_path, model, {"step": 2})
        except _Stop:
            pass
        else:
            raise AssertionError("the held SIGTERM was never delivered")
        assert signal.getsignal(signal.SIGTERM) is stop, "the handler in place before the save is back"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert written == ["model.safetensors", "meta.json"]
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 2
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want, got), name
