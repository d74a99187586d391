"""Characterisation fixtures of the training paths: record them, or fingerprint a zoo to compare.

Why: the training core is being restructured (issue 8: six epoch loops become one engine). Before any
structural move, every path is run on micro recipes and what it writes is stored here: each model's
status, history rows and a fingerprint of every saved tensor (sha256 of its bytes, plus float64 sum and
norm so that a mismatch says how far off it is). ``tests/test_golden.py`` regenerates and compares.

Cases (recipe x ``VITZOO_POPULATION``), which together run every path of today's code:

- ``cnn-off``: CNN groups one by one, the Lion run through the per-run loop, twins one by one;
- ``cnn-on``: CNN groups and twins as stacked populations (any size), Lion per run;
- ``vit-off``: ViT pre-training (mixup, SimCLR) and fine-tunes (full, LoRA, linear) per run;
- ``vit-on``: the same pre-training, fine-tunes as populations.

Record (CPU, one thread; rewrite only in a commit that says which outputs changed and why)::

    python tests/golden/record.py            # all cases
    python tests/golden/record.py cnn-on     # one case

``platform.json`` says under which torch and CPU capability they were recorded. Another torch release or
another CPU (AVX2 against AVX-512 kernels) changes float rounding: up to ~4e-4 relative in these micro zoos,
measured on an AVX2 AMD EPYC against the first recording (torch 2.14.1 both times, by the previous session's
README). Then re-record at the last commit that passed (a worktree) and compare the change against those.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
CASES = {"cnn-off": ("cnn.yaml", "off"), "cnn-on": ("cnn.yaml", "on"),
         "vit-off": ("vit.yaml", "off"), "vit-on": ("vit.yaml", "on")}


def tensor_print(t) -> dict[str, Any]:
    """sha256 of the tensor's bytes (bitwise identity) and float64 sum / norm (how far off, if not)."""
    import torch

    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
    f = t.double()
    return {"sha256": digest, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "sum": float(f.sum()), "norm": float(f.norm())}


def fingerprint(zoo: Path) -> dict[str, Any]:
    """What the zoo's training wrote, per model: status, final epoch, history, every saved tensor."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for folder in sorted((zoo / "models").iterdir()):
        run = json.loads((folder / "run.json").read_text())
        tensors = {}
        for f in sorted(folder.glob("*.safetensors")):
            for k, v in sorted(load_file(f).items()):
                tensors[f"{f.name}:{k}"] = tensor_print(v)
        out[folder.name] = {"status": run["status"], "final_epoch": run["final_epoch"],
                            "history": run.get("history"), "tensors": tensors}
    return out


def run_case(case: str, out: Path) -> dict[str, Any]:
    """Generate the case's zoo into ``out`` (CPU, one thread) and return its fingerprint."""
    import torch

    from vitzoo.train.generate import generate

    recipe, switch = CASES[case]
    old = os.environ.get("VITZOO_POPULATION")
    os.environ["VITZOO_POPULATION"] = switch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(HERE / recipe, out, progress=False, log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("VITZOO_POPULATION", None)
        else:
            os.environ["VITZOO_POPULATION"] = old
    return fingerprint(out)


def main(cases: list[str]) -> None:
    for case in cases or list(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            fp = run_case(case, Path(tmp) / "zoo")
        path = HERE / f"{case}.json"
        path.write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
        print(f"{case}: {len(fp)} models, {sum(len(m['tensors']) for m in fp.values())} tensors -> {path}")
    (HERE / "platform.json").write_text(json.dumps(platform_facts(), indent=1) + "\n")


def platform_facts() -> dict[str, str]:
    """What decides the CPU kernels' float rounding: the torch release and the vector ISA it dispatches to."""
    import platform

    import torch

    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


if __name__ == "__main__":
    main(sys.argv[1:])
