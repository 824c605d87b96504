"""How HLoRA's layer coefficients (eq 15) spread over the LoRA modules for each way of scaling the norms.

Reads an importance file recorded on a real general stage (``hlora_importance.safetensors``, e.g. from
``forgetless run examples/hlora_shared.yaml``: ``runs/hlora-piqa-medmcqa/stages/general-*/``) and prints, per
setting, the largest and smallest coefficient, their ratio, and the effective number of modules exp(H(c))
(n for uniform, 1 for one-hot). Settings: the formula as printed (softmax of the raw norms), the authors'
released code (norms times 1e-8), and forgetless's scale-free form softmax(||Omega_l|| / max_l ||Omega_l|| / T)
for several temperatures T. This is the measurement behind the default temperature.

Usage: python bench/hlora_temperature.py PATH [PATH ...]
"""

from __future__ import annotations

import argparse
import math

import torch

from forgetless.methods.hlora import DEFAULT_TEMPERATURE, layer_coefficients, load_importance


def describe(c: torch.Tensor) -> str:
    c = c.double()
    entropy = float(-(c * c.clamp_min(1e-300).log()).sum())
    ratio = float(c.max() / c.min()) if float(c.min()) > 0 else math.inf
    return f"max {float(c.max()):.4f}  min {float(c.min()):.2e}  max/min {ratio:9.3g}  effective modules {math.exp(entropy):6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    for path in args.paths:
        omega = load_importance(path)["omega"]
        names = list(omega)
        norms = torch.stack([torch.linalg.vector_norm(omega[n].float()) for n in names]).double()
        print(f"# {path}: {len(names)} modules; ||Omega_l||_2 from {float(norms.min()):.4g} to {float(norms.max()):.4g} "
              f"(median {float(norms.median()):.4g})")
        rows = [("as printed: softmax(||Omega||)", layer_coefficients(norms, 1.0, "none")),
                ("authors' code: softmax(1e-8 ||Omega||)", layer_coefficients(norms * 1e-8, 1.0, "none"))]
        rows += [(f"forgetless: softmax(||Omega||/max / {t:g})", layer_coefficients(norms, t, "max"))
                 for t in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)]
        rows.append(("uniform (hlora-no-layer)", layer_coefficients(norms, layer_wise=False)))
        width = max(len(r[0]) for r in rows)
        for label, c in rows:
            print(f"{label:<{width}}  {describe(c)}")
        default = layer_coefficients(norms, DEFAULT_TEMPERATURE, "max")
        top = torch.argsort(default, descending=True)[:5]
        print(f"top modules at the default (T={DEFAULT_TEMPERATURE:g}): " + ", ".join(f"{names[i]} {float(default[i]):.4f}" for i in top))


if __name__ == "__main__":
    main()
