"""The Hessian's extreme eigenvalues of one run of this experiment by Lanczos (``landscape: {hessian_method:
lanczos}``), beside what the flatness step recorded with the power iteration.

The experiment's landscape objective (its settings: held-out blocks, batch, precision, LoRA parameters) and seed; 20
Lanczos steps, as many products as the recorded power iterations at most. Needs the run's adapter (runs/adapters/RUN_ID:
on the machine that ran the experiment only). From the repository's root:

    OMP_NUM_THREADS=1 python docs/results/forgetting-rerun/scripts/lanczos_check.py sam__arc_easy__seed0 [STEPS]
"""
import json
import sys
import time

from forgetless.config import load_experiment
from forgetless.data import lm_examples, pack_blocks
from forgetless.experiment import _texts
from forgetless.landscape.metrics import hessian_lanczos
from forgetless.landscape.objective import model_objective
from forgetless.models import load_adapter, load_model

ROOT = "docs/results/forgetting-rerun"
rid, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
exp = load_experiment(f"{ROOT}/experiment.yaml")
s = exp.landscape
model, tok = load_model(exp.model, precision=s.precision)
texts = _texts(exp, exp.general.heldout)
examples = lm_examples(pack_blocks(texts, tok, exp.general.block_size, max_blocks=s.blocks))
model = load_adapter(model, f"{ROOT}/runs/adapters/{rid}", trainable=True)
recorded = json.load(open(f"{ROOT}/runs/runs/{rid}.json"))["landscape"]["metrics"]
t = time.time()
with model_objective(model, examples, s.params, s.batch_size, s.precision) as obj:
    got = hessian_lanczos(obj, steps=steps, seed=s.seed)
print(f"{rid}: Lanczos ({steps} steps, {time.time() - t:.0f} s): top {got['top']:.4g} (residual "
      f"{got['top_residual']:.2g}), bottom {got['bottom']:.4g} (residual {got['bottom_residual']:.2g}); recorded by "
      f"power iteration: top {recorded['hessian_top_eigenvalue']:.4g} (residual {recorded['hessian_top_residual']:.2g}), "
      f"dominant {recorded['hessian_dominant_eigenvalue']:.4g} (residual {recorded['hessian_dominant_residual']:.2g})",
      flush=True)
