"""README's preset tables and ``ns-train --help``'s preset lines say what the presets are: every
value in the option tables (``| option (`--pipeline.model.*`) | `vq3d` | `vq3d-tiny` | ... |``) is
read back from the README and compared with the config ``ns-train`` builds for that preset."""

import functools
import math
import re
from pathlib import Path

import pytest

from vq3d_nerfstudio.ns.method_configs import build_trainer_config, vq3d, vq3d_tiny

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| option (`--pipeline.model.*`) | `vq3d` | `vq3d-tiny` | what it does |"
WORDS = {"off": False, "on": True, "hub cache": None}
"""README's words for values: a boolean off / on; no weights path (torch hub's cache)."""


def preset_rows():
    """``(option flag, vq3d value text, vq3d-tiny value text)`` for every option of the tables."""
    lines = README.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == HEADER]
    assert len(starts) >= 2, "README's preset tables are gone: update this test with them"
    rows = []
    for start in starts:
        for line in lines[start + 2:]:
            if not line.startswith("|"):
                break
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            flags = re.findall(r"`([a-z0-9.-]+)`", cells[0])
            separator = " / " if " / " in cells[0] else ", "
            big = cells[1].split(separator) if len(flags) > 1 else [cells[1]]
            tiny = big if cells[2] == "same" else (cells[2].split(separator) if len(flags) > 1 else [cells[2]])
            assert len(big) == len(tiny) == len(flags), line
            rows += [(flag, a, b) for flag, a, b in zip(flags, big, tiny)]
    return rows


def option_value(config, flag: str):
    """The value of option ``flag`` below ``config``: ``adversarial.loss-mult`` is ``config.adversarial.loss_mult``."""
    return functools.reduce(getattr, flag.replace("-", "_").split("."), config)


def test_option_value_follows_nested_names():
    model = build_trainer_config("vq3d").pipeline.model
    assert option_value(model, "adversarial.loss-mult") == 0.1 and option_value(model, "image-size") == 256
    with pytest.raises(AttributeError):
        option_value(model, "adversarial-loss-mult")  # the old flat name is no field


def matches(text: str, value) -> bool:
    text = re.sub(r"\s*\(.*\)$", "", text.strip().strip("`"))  # "0 (off)" -> "0"
    if text in WORDS:
        return value is WORDS[text] or (WORDS[text] is False and value == 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(float(text), float(value))
    if hasattr(value, "_target"):  # a nested component: its subcommand name
        return text == re.sub(r"Config$", "", type(value).__name__).lower() + "-quantizer"
    return text == str(value)


@pytest.mark.parametrize("preset", ["vq3d", "vq3d-tiny"])
def test_readme_preset_tables_match_the_presets(preset):
    model = build_trainer_config(preset).pipeline.model
    rows = preset_rows()
    assert len(rows) > 30
    wrong = []
    for flag, big, tiny in rows:
        value = option_value(model, flag)
        text = big if preset == "vq3d" else tiny
        if not matches(text, value):
            wrong.append(f"--pipeline.model.{flag}: README says {text!r}, the preset has {value!r}")
    assert not wrong, "\n".join(wrong)


def test_ns_train_help_names_each_presets_size():
    """The method descriptions (``ns-train --help``) give each preset's image size and token grid."""
    for spec, preset in ((vq3d, "vq3d"), (vq3d_tiny, "vq3d-tiny")):
        model = spec.config.pipeline.model
        side = model.image_size // model.patch_size
        assert f"{model.image_size} px, {side}x{side} tokens" in spec.description, preset
        assert f"{model.quantizer.codebook_size:,}" in spec.description, preset
