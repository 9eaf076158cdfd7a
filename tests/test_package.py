"""The package's top level: light to import, the model class one attribute away."""

from __future__ import annotations

from tests.conftest import run_python


def test_top_level_model_class_is_loaded_on_first_use():
    code = (
        "import sys, automodel\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from automodel import AutoModelForImageTextToText\n"
        "from automodel.models import AutoModelForImageTextToText as Models\n"
        "assert AutoModelForImageTextToText is Models\n"
        "assert automodel.AutoModelForImageTextToText is Models\n"
        "try:\n"
        "    automodel.NoSuchThing\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_command_line_starts_without_torch():
    # `automodel --help` and usage errors answer at once; torch loads when a command runs.
    code = (
        "import sys, automodel.cli\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
