"""Hutchinson trace with more samples and the smallest Hessian eigenvalue for one run of the lr 3e-3 experiment.

The experiment's landscape objective (its settings: held-out blocks, batch, precision, LoRA parameters), 24 Rademacher
probes other than the 6 the flatness step used, and 20-iteration power iterations on H and on H - lambda I. Needs the
run's adapter (runs/adapters/RUN_ID: on the machine that ran the experiment only). From the repository's root:

    OMP_NUM_THREADS=1 python docs/results/forgetting-lr3e-3/scripts/trace_check.py "hlora+sam__arc_easy__seed0"
"""
import statistics
import sys
import time

from forgetless.config import load_experiment
from forgetless.experiment import _texts
from forgetless.data import lm_examples, pack_blocks
from forgetless.models import load_adapter, load_model
from forgetless.landscape.objective import model_objective, dot
from forgetless.landscape.metrics import _power_iteration, _random_vector

rid = sys.argv[1]
exp = load_experiment("docs/results/forgetting-lr3e-3/experiment.yaml")
s = exp.landscape
model, tok = load_model(exp.model, precision=s.precision)
examples = lm_examples(pack_blocks(_texts(exp, exp.general.heldout), tok, exp.general.block_size, max_blocks=s.blocks))
model = load_adapter(model, f"docs/results/forgetting-lr3e-3/runs/adapters/{rid}", trainable=True)
t = time.time()
with model_objective(model, examples, s.params, s.batch_size, s.precision) as obj:
    values = []
    for k in range(24):
        z = _random_vector(obj, 5000 + k, rademacher=True)
        values.append(dot(z, obj.hvp(z)))
    mean, se = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    top, _ = _power_iteration(obj, 20, 1e-4, 7)
    shifted, smallest = _power_iteration(obj, 20, 1e-4, 8, shift=max(top, 0.0) + 1e-3)
    print(f"{rid}: Hutchinson trace over 24 new probes {mean:.2f} +- {se:.2f} (probes {min(values):.1f}..{max(values):.1f}); "
          f"dominant eigenvalue {top:.3f}; smallest eigenvalue (power iteration on H - lambda I) {shifted + max(top, 0.0) + 1e-3:.3f}; "
          f"{time.time() - t:.0f} s", flush=True)
