"""Writing the run's outputs atomically: a folder appears complete or not at all."""

from __future__ import annotations

import shutil
from pathlib import Path

from automodel.config.loader import dump_yaml
from automodel.errors import UsageError


def check_writable(directory: str | Path) -> Path:
    """Creates ``directory`` and proves a file can be written there, before training starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"checkpoint.checkpoint_dir {directory} is not writable ({e.strerror}); choose another"
        ) from None
    return directory


def save_config(cfg: dict, directory: str | Path) -> Path:
    path = Path(directory) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(path)
    return path


def save_hf_folder(model, processor, out_dir: str | Path) -> Path:
    """Saves ``model`` and ``processor`` as an ordinary Hugging Face folder.

    The folder is written under a temporary name and renamed, so a crash mid-save never leaves
    a half-written ``final_model`` that looks complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
