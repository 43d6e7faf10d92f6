"""docs/plugins.md's public API section stays true: every module and name it lists
imports, and the pieces it calls stable for reuse raise messages that name a file layout,
not the family being run."""

import importlib
import re
from pathlib import Path

import pytest
import torch

from sar_core.adapter import CheckpointError

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
FIX = Path(__file__).parent / "fixtures"


def section() -> str:
    text = DOC.read_text()
    start = text.index("## 6. What a plugin may import")
    return text[start:text.index("\n## ", start + 1)]


def resolve(dotted: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)


def listed() -> list[tuple[str, list[str]]]:
    """(module, [names]) for every dotted name in the section: a table row's names, or the
    names in parentheses right after it."""
    out = []
    for line in section().splitlines():
        row = re.match(r"\| `(sar_\w+(?:\.\w+)+)` \|(.*)\|", line)
        if row:
            out.append((row.group(1), re.findall(r"`([A-Za-z_]\w*)`", row.group(2))))
    prose = re.sub(r"^\|.*$", "", section(), flags=re.M)
    for dotted, names in re.findall(r"`(sar_\w+(?:\.\w+)+)`(?:\s*\(([^)]*)\))?", prose):
        out.append((dotted, re.findall(r"`([A-Za-z_]\w*)`", names or "")))
    return out


def test_the_section_lists_the_contract_modules_and_the_reusable_pieces():
    modules = {m for m, _ in listed()}
    for m in ("sar_core.adapter", "sar_core.batch", "sar_core.schedule", "sar_core.tokens", "sar_core.hookspecs",
              "sar_core.plugins", "sar_core.checkpoint_io", "sar_core.testing", "sar_core.conformance",
              "sar_core.sar.sampling", "sar_core.sar.rollouts", "sar_core.sar.losses", "sar_core.sar.prefix_cache",
              "sar_core.rollouts", "sar_adapters.var.tokenizer", "sar_adapters.common.adaln"):
        assert m in modules, m


@pytest.mark.parametrize("dotted,names", listed(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_listed_module_and_name_imports(dotted, names):
    obj = resolve(dotted)
    for name in names:
        assert hasattr(obj, name), f"{dotted} has no {name}"


def test_old_flat_paths_named_there_are_aliases():
    from sar_core._moved import MOVED

    for old in ("rollouts", "losses", "sampling", "prefix_cache", "sar_step", "trainer"):
        new = MOVED[f"sar_core.{old}"]
        assert importlib.import_module(f"sar_core.{old}") is importlib.import_module(new)


def test_vars_tokenizer_reader_names_the_layout_not_a_family(tmp_path):
    """Another family reusing VAR's VQVAE reader (as Switti does) must not tell its user the
    run is a VAR run: the messages name the file's layout."""
    from sar_adapters.var.checkpoint import read_tokenizer

    cases = [FIX / "var" / "var_tiny_d2w64.pth",                  # a backbone given as the tokenizer
             FIX / "flexvar" / "FlexVAE_tiny.pth"]                 # another family's tokenizer
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    cases.append(tmp_path / "partial.pth")                         # keys missing
    for path in cases:
        with pytest.raises(CheckpointError) as err:
            read_tokenizer(path)
        msg = str(err.value)
        assert "VAR's VQVAE layout" in msg or "VQVAE tokenizer in VAR's layout" in msg, msg
        assert "not a VAR" not in msg and "load it with" not in msg, msg
