"""Untrusted inputs (docs/reliability.md): a config, a model folder, a checkpoint or a chat
template from elsewhere runs no code unless the config says so.

Each attack writes a marker file if its code runs; every test asserts the marker is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from automodel.cli import main
from automodel.config.instantiate import resolve_target
from automodel.config.loader import load_yaml
from automodel.datasets.collate import default_collate_fn, has_rows
from automodel.errors import UsageError
from automodel.models.auto import AutoModelForImageTextToText, load_processor
from automodel.recipes.vlm.builders import build_processor, run_prepare
from automodel.recipes.vlm.config import resolve_config
from automodel.training.state import load_train_state
from tests.conftest import ROOT

NEMO_YAML = ROOT / "examples/vlm/gemma3_vl_4b_cord_v2.yaml"
EMBED = "language_model.model.embed_tokens.weight"  # a tensor of the twin, as saved


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------ _target_
@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "builtins.eval",
        "subprocess.run",
        # Through an allowed module's attribute: the module it leads to is checked too.
        "torch.os.system",
        "transformers.utils.hub.os.system",
        "torch.serialization.pickle.loads",
        "automodel.config.instantiate.importlib.import_module",
        "automodel.errors.UsageError.__init__",
    ],
)
def test_a_target_outside_the_allowlist_is_refused(target, tmp_path, capsys):
    with pytest.raises(UsageError, match="outside the allowed modules|private attribute"):
        resolve_target(target, "prepare[0]")
    config = tmp_path / "cfg.yaml"
    config.write_text(NEMO_YAML.read_text())
    line = _one_line_error(
        capsys, main(["validate", "-c", str(config), f"--optimizer._target_={target}"])
    )
    assert target in line


def test_allowed_target_prefixes_opt_in_and_nothing_beyond(tmp_path):
    copy = tmp_path / "copy.yaml"
    cfg = load_yaml(NEMO_YAML)
    cfg["prepare"] = [{"_target_": "shutil.copyfile", "src": str(NEMO_YAML), "dst": str(copy)}]
    with pytest.raises(UsageError, match=r"prepare\[0\]._target_: shutil.copyfile is outside"):
        resolve_config(cfg)
    cfg["allowed_target_prefixes"] = ["shutil."]
    resolved, _ = resolve_config(cfg)
    run_prepare(resolved)
    assert copy.read_text() == NEMO_YAML.read_text()
    # Opting in to shutil does not reach the modules shutil itself imports.
    cfg["prepare"] = [{"_target_": "shutil.os.system", "command": "true"}]
    with pytest.raises(UsageError, match="shutil.os.system leads to os, outside"):
        resolve_config(cfg)


# ------------------------------------------------------------------------------ remote code
REMOTE_CODE = """
import os
from pathlib import Path

Path(os.environ["AUTOMODEL_TEST_MARKER"]).write_text("the folder's code ran")

from transformers import Gemma3Config, Gemma3ForConditionalGeneration


class RemoteConfig(Gemma3Config):
    model_type = "remote_vlm"


class RemoteModel(Gemma3ForConditionalGeneration):
    config_class = RemoteConfig
"""


def _remote_code_folder(twin: Path, root: Path, model_type: str | None) -> Path:
    """A copy of ``twin`` whose config.json points its auto classes at a local .py file.

    ``model_type``: the config's new type (one transformers does not know), or None to keep
    Gemma 3's. The folder name is unique: transformers imports the code under that name.
    """
    folder = root / f"remote_{uuid.uuid4().hex[:8]}"
    shutil.copytree(twin, folder)
    (folder / "remote.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "remote.RemoteConfig",
        "AutoModelForImageTextToText": "remote.RemoteModel",
    }
    if model_type is not None:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "marker"
    monkeypatch.setenv("AUTOMODEL_TEST_MARKER", str(path))
    return path


def test_remote_code_does_not_run_without_the_config_flag(tiny_gemma3, tmp_path, marker, capsys):
    folder = _remote_code_folder(tiny_gemma3, tmp_path, "remote_vlm")
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    args = ["generate", "--model", str(folder), "--image", str(tmp_path / "x.png")]
    line = _one_line_error(capsys, main([*args, "--prompt", "Hi"]))
    assert "holds its own Python code" in line and "model.trust_remote_code: true" in line
    with pytest.raises(UsageError, match="holds its own Python code"):
        AutoModelForImageTextToText.from_pretrained(str(folder))
    cfg = {"model": {"pretrained_model_name_or_path": str(folder)}}
    build_processor(cfg)  # its processor files are ordinary: it loads, without asking
    assert not marker.exists()


def test_a_known_model_type_with_auto_map_loads_the_built_in_class(tiny_gemma3, tmp_path, marker):
    folder = _remote_code_folder(tiny_gemma3, tmp_path, None)
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert not marker.exists()


def test_remote_code_runs_with_trust_remote_code_true(tiny_gemma3, tmp_path, marker):
    folder = _remote_code_folder(tiny_gemma3, tmp_path, "remote_vlm")
    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "RemoteModel" and marker.exists()


# ------------------------------------------------------------------------------ pickles
class _WritesMarker:
    """Unpickling this object calls ``open(path, "w")``: the marker appears if it is loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_training_state_holding_a_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"step": 3, "payload": _WritesMarker(marker)}, tmp_path / "train_state.pt")
    with pytest.raises(UsageError) as error:
        load_train_state(tmp_path)
    message = str(error.value)
    assert "cannot read the training state" in message and "\n" not in message
    assert not marker.exists()


def _with_bin(twin: Path, root: Path, keep_safetensors: bool, payload=None) -> Path:
    """A copy of ``twin`` with a pytorch_model.bin: every weight 0.5, or ``payload``."""
    folder = root / ("both" if keep_safetensors else "bin_only")
    shutil.copytree(twin, folder)
    weights = {
        k: torch.full_like(v, 0.5) for k, v in load_file(folder / "model.safetensors").items()
    }
    torch.save(weights if payload is None else payload, folder / "pytorch_model.bin")
    if not keep_safetensors:
        os.remove(folder / "model.safetensors")
    return folder


def _embeddings(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


def test_safetensors_win_over_a_pytorch_bin_in_the_same_folder(tiny_gemma3, tmp_path):
    folder = _with_bin(tiny_gemma3, tmp_path, keep_safetensors=True)
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    assert torch.equal(_embeddings(model), load_file(tiny_gemma3 / "model.safetensors")[EMBED])


def test_a_bin_only_folder_loads_its_tensors_with_weights_only(tiny_gemma3, tmp_path):
    folder = _with_bin(tiny_gemma3, tmp_path, keep_safetensors=False)
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    assert bool((_embeddings(model) == 0.5).all())


def test_a_bin_holding_a_pickled_object_is_refused_in_one_line(tiny_gemma3, tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = _with_bin(tiny_gemma3, tmp_path, False, payload={EMBED: _WritesMarker(marker)})
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    args = ["generate", "--model", str(folder), "--image", str(tmp_path / "x.png")]
    line = _one_line_error(capsys, main([*args, "--prompt", "Hi"]))
    assert "objects other than tensors" in line and "weights_only=True" in line
    assert not marker.exists()


def test_config_overrides_cannot_change_how_weights_are_read(tiny_gemma3):
    with pytest.raises(UsageError, match="config has no attribute 'weights_only'"):
        AutoModelForImageTextToText.from_pretrained(
            str(tiny_gemma3), config_overrides={"weights_only": False}
        )


# ------------------------------------------------------------------------------ templates
def test_a_chat_template_cannot_run_code(tiny_gemma3, tmp_path):
    marker = tmp_path / "marker"
    processor = load_processor(tiny_gemma3)
    processor.chat_template = (
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    )
    image = Image.new("RGB", (16, 16))
    sample = {
        "id": "s",
        "conversation": [
            {"role": "user", "content": [{"type": "image", "image": image}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        ],
    }
    batch = default_collate_fn([sample], processor)
    assert not has_rows(batch) and "is unsafe" in batch["dropped"][0][1]
    assert not marker.exists()


# ------------------------------------------------------------------------------ datasets
def test_a_dataset_folder_with_a_loading_script_does_not_run_it(tmp_path):
    from automodel.datasets.vlm import make_conversation_dataset

    marker = tmp_path / "marker"
    folder = tmp_path / "myset"
    folder.mkdir()
    (folder / "myset.py").write_text(f"open({str(marker)!r}, 'w')\n")
    with pytest.raises(UsageError, match="Dataset scripts are no longer supported"):
        make_conversation_dataset(folder)
    assert not marker.exists()
