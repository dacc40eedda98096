"""Start-up hook of the CPU development and test shim (see ``bacon_sglang.cpu_shim``).

Python imports this module at start-up when this folder is on ``PYTHONPATH``. It chains to
any other ``sitecustomize`` further down the path, then routes ``sgl_kernel`` to the
pure-PyTorch stub when no CUDA device is present.
"""

import importlib.util
import os
import sys


def _chain_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


try:
    _chain_next_sitecustomize()
finally:
    try:
        from bacon_sglang.cpu_shim import install

        install()
    except Exception as exc:  # never break interpreter start-up
        sys.stderr.write(f"bacon_sglang.cpu_shim: not installed: {exc}\n")
