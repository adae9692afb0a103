"""Keep transformers from importing optional packages a run does not use.

Building a model imports transformers' quantizer registry and generation helpers, which
import every optional package found installed: torchao (its import registers custom ops and
dynamo/Triton wrappers: seconds on a GPU machine) and scikit-learn (for assisted decoding's
ROC curve), and scipy (for object-detection losses). A plain fine-tune uses none of them. `importlib.util.find_spec`, which transformers'
`is_*_available` checks call, answers "not installed" for a name whose sys.modules entry is
None, so during the model build those packages look absent and are skipped; the entries
are removed afterwards, so a later `import torchao` (peft, an 8-bit optimizer) works as usual.

A package is hidden only while transformers has not yet asked about it: once its answer
is cached "available", hiding the package would turn transformers' import into an error.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

# package -> the transformers.utils.import_utils check that would import it
OPTIONAL = {"torchao": "is_torchao_available", "sklearn": "is_sklearn_available", "scipy": "is_scipy_available"}


def _not_asked_yet(check_name: str) -> bool:
    import_utils = sys.modules.get("transformers.utils.import_utils")
    if import_utils is None:
        return True
    check = getattr(import_utils, check_name, None)
    info = getattr(check, "cache_info", None)
    return info is not None and info().currsize == 0


@contextmanager
def without(packages: list[str]):
    """Hide `packages` (not yet imported, not yet asked about) from transformers for the block."""
    hidden = [p for p in packages if p not in sys.modules and _not_asked_yet(OPTIONAL.get(p, ""))]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield hidden
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def forget_answers(packages: list[str]) -> None:
    """Clear transformers' cached availability answers for `packages` (given while they were
    hidden), so that the next question looks again."""
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for name in packages:
        clear = getattr(getattr(import_utils, OPTIONAL.get(name, ""), None), "cache_clear", None)
        if clear is not None:
            clear()


def enabled() -> bool:
    """VERLITE_LEAN_IMPORTS=0 hides nothing (should a package turn out to be needed after all)."""
    return os.environ.get("VERLITE_LEAN_IMPORTS", "1") != "0"


def unused_by(model_cfg, optimizer_impl: str, user_code: bool) -> list[str]:
    """The optional packages a run never needs: torchao only for NF4 quantization, its
    optimizers and (through peft, which imports it) LoRA. A user's own dataset class
    (`user_code`) may import anything, so nothing is hidden from it; VERLITE_LEAN_IMPORTS=0
    hides nothing either (should a package turn out to be needed after all)."""
    if user_code or not enabled():
        return []
    out = ["sklearn", "scipy"]
    if not model_cfg.quantization and optimizer_impl != "torchao.optim" and model_cfg.lora_rank <= 0:
        out.append("torchao")
    return out
