"""``forgetless run --jobs N``: runs trained side by side in worker processes give the records one process gives."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from forgetless.cli import main
from forgetless.config import load_experiment
from forgetless.experiment import _share_out, job_groups, plan_runs, run_experiment
from tests.unit.test_experiment import write_experiment


def test_job_groups_keep_runs_that_share_a_general_stage_together(tmp_path, tiny_model_dir):
    exp = load_experiment(write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu", "lora-nu-mu",
                                                                                "replay", "hlora"]))
    groups = [[job.rid for job in group] for group in job_groups(exp, plan_runs(exp))]
    assert sorted(groups) == sorted([["base__gen__seed0"], ["lora-mu__gen__seed0"],
                                     ["lora-nu-mu__gen__seed0", "replay__gen__seed0"], ["hlora__gen__seed0"],
                                     ["base__gen__seed1"], ["lora-mu__gen__seed1"],
                                     ["lora-nu-mu__gen__seed1", "replay__gen__seed1"], ["hlora__gen__seed1"]])
    # seed 0's shared stage in the cache: nothing to train once, so its runs go to workers separately
    from forgetless.experiment import general_stage_key

    job = next(j for j in plan_runs(exp) if j.rid == "lora-nu-mu__gen__seed0")
    cached = exp.output / "stages" / f"general-{general_stage_key(exp, job.recipe, 0)}"
    cached.mkdir(parents=True)
    (cached / "adapter_model.safetensors").touch()
    groups = [[job.rid for job in group] for group in job_groups(exp, plan_runs(exp))]
    assert ["lora-nu-mu__gen__seed0"] in groups and ["replay__gen__seed0"] in groups
    assert ["lora-nu-mu__gen__seed1", "replay__gen__seed1"] in groups and len(groups) == 9


def _scores(folder):
    out = {}
    for path in sorted((folder / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        out[record["run_id"]] = (record["general_ppl"], record["tasks"], record.get("suite"),
                                 [s.get("cached", False) for s in record["stages"]])
    return out


def test_two_workers_give_the_records_of_one_process(tmp_path, tiny_model_dir, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers get 1 thread each: the same arithmetic as this process
    try:
        one, two = tmp_path / "one", tmp_path / "two"
        for folder in (one, two):
            folder.mkdir()
            write_experiment(folder, tiny_model_dir, methods=["base", "lora-mu", "lora-nu-mu", "replay"], seeds=[0])
        run_experiment(load_experiment(one / "exp.yaml"), progress=False)
        assert main(["run", str(two / "exp.yaml"), "--jobs", "2", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    shared = "1 torch thread(s) each" if not torch.cuda.is_available() else _share_out(2)[2]  # a GPU: its own words
    assert f"4 run(s) in 3 group(s) sharing a general stage, on 2 worker processes ({shared})" in text
    one, two = one / "out", two / "out"
    assert _scores(one) == _scores(two)  # replay reused lora-nu-mu's general stage in its worker too
    assert _scores(two)["replay__gen__seed0"][3] == [True, False]
    assert (two / "results.md").is_file() and not (two / ".forgetless.lock").read_text().strip()
    assert len(list((two / "stages").iterdir())) == 1


def test_a_failing_run_is_raised_after_the_other_groups_finish(tmp_path, tiny_model_dir, capsys):
    from tests.unit.test_reliability import DIVERGING

    write_experiment(tmp_path, tiny_model_dir, **DIVERGING | {"methods": ["lora-mu", "rslora", "base"], "seeds": [0]})
    assert main(["run", str(tmp_path / "exp.yaml"), "--jobs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    # both failures named (only the first was: the other run's failure appeared nowhere)
    for rid in ("lora-mu__gen__seed0", "rslora__gen__seed0"):
        assert f"{rid}: non-finite loss (nan) at step 2" in err, err
    assert "forgetless: error (another worker): " in err
    assert [p.name for p in (tmp_path / "out" / "runs").glob("*.json")] == ["base__gen__seed0.json"]


def test_jobs_must_be_positive(tmp_path, tiny_model_dir, capsys):
    write_experiment(tmp_path, tiny_model_dir)
    assert main(["run", str(tmp_path / "exp.yaml"), "--jobs", "0"]) == 2
    assert "argument --jobs: must be >= 1" in capsys.readouterr().err


def test_two_workers_measure_the_landscape_as_one_process(tmp_path, tiny_model_dir, capsys):
    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 2, "trace_samples": 1, "ascent_steps": 1,
                 "all_weights_seeds": [0]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, two = tmp_path / "one", tmp_path / "two"
        for folder in (one, two):
            folder.mkdir()
            write_experiment(folder, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0, 1], landscape=landscape)
        run_experiment(load_experiment(one / "exp.yaml"), progress=False)
        run_experiment(load_experiment(two / "exp.yaml"), progress=False, jobs=2)
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out  # each worker measured its runs right after training them: nothing left after
    assert "landscape: measuring" not in text
    assert all(f"{rid}: loss " in text for rid in ("lora-mu__gen__seed0", "lora-mu__gen__seed1"))

    def flatness(folder):  # run time and the digest (it holds the data's path) aside
        def strip(entry):
            return {k: strip(v) if isinstance(v, dict) and k == "all_weights" else v for k, v in entry.items()
                    if k not in ("seconds", "digest")}

        return {p.stem: strip(json.loads(p.read_text())["landscape"]) for p in (folder / "out" / "runs").glob("*.json")}

    measured = flatness(two)
    assert measured == flatness(one)  # every metric and surface path equal
    for rid in ("lora-mu__gen__seed0", "lora-mu__gen__seed1"):
        assert "hessian_top_eigenvalue" in measured[rid]["metrics"]
    assert "metrics" in measured["base__gen__seed0"]["all_weights"]
    # the report has the flatness section, with the surfaces read from the experiment folder
    from forgetless.reporting.report import build_report

    md = build_report(two / "out").read_text()
    assert "## Flatness and forgetting" in md and "Per method, mean ± std over its runs:" in md
    means = md.split("Per method, mean ± std over its runs:", 1)[1].split("Per run:", 1)[0]
    assert "| lora-mu | 2 |" in means
    section = md.split("## Loss surface over the LoRA directions and over all weights", 1)[1]
    assert "| base | 0 | all weights |" in section and "n/a" not in section.split("![", 1)[0]
    assert (two / "out" / "report" / "surfaces_lora_vs_all.png").read_bytes()[:4] == b"\x89PNG"


def _workers_started(proc, guard: float = 180.0) -> int:
    """Read ``run --jobs 2``'s stdout until both workers have said which run they took (each says it in one whole
    line: a line cut by the other worker's would not count); a hang guard kills the process group after ``guard`` s,
    which ends the read."""
    import os
    import signal
    import threading

    guard_timer = threading.Timer(guard, lambda: os.killpg(proc.pid, signal.SIGKILL))
    guard_timer.start()
    try:
        started = 0
        for line in proc.stdout:
            started += line.startswith("[worker ") and line.count("[worker ") == 1
            if started == 2:
                break
        return started
    finally:
        guard_timer.cancel()


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_stops_every_worker_at_once(tmp_path, tiny_model_dir, stop):
    """Ctrl-C (SIGINT to the terminal's process group) ends `run --jobs 2` with exit code 130 and its one line, the
    workers with it: runs far too long to finish show that nothing waits for them. SIGTERM to the main process
    alone (`kill PID`) does the same, with exit code 143: the workers, which it does not reach, are stopped too."""
    import os
    import signal
    import subprocess
    import sys

    write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu", "lora-nu-mu"], seeds=[0, 1],
                     train={"general": {"max_steps": 100000, "batch_size": 4},
                            "domain": {"max_steps": 100000, "batch_size": 2}})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # SIGABRT dumps every thread's stack
    # SIGINT at its default in the child, as in a terminal: a shell starts background jobs (`make test &`, nohup ...
    # &) with SIGINT ignored, the child would inherit that, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "forgetless", "run", str(tmp_path / "exp.yaml"), "--jobs", "2",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert _workers_started(proc) == 2
        if stop == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)  # a hang guard: it stops within seconds
        except subprocess.TimeoutExpired:  # say where it hangs: the parent's threads, then its process tree
            tree = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,args", "-g", str(proc.pid)], capture_output=True,
                                  text=True).stdout
            os.kill(proc.pid, signal.SIGABRT)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"run --jobs 2 did not stop within 120 s of SIGINT\nprocesses:\n{tree}\nstderr:\n{err[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (143 if stop == "sigterm" else 130), err[-2000:]
    said = "terminated (SIGTERM)" if stop == "sigterm" else "interrupted"
    assert f"forgetless: {said}: the runs in progress were stopped and are not recorded" in err
    import time

    for _ in range(30):  # a killed worker still tearing down its memory shows as "R [python]" for a moment on a
        # loaded machine (seen in CI beside a running experiment): give it seconds, not the run's hours
        group = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(proc.pid)], capture_output=True,
                               text=True).stdout
        alive = [line for line in group.splitlines() if line.split()[1][0] != "Z"]  # a zombie has ended
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, group  # no worker left behind
    assert not list((tmp_path / "out" / "runs").glob("*.json"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_workers_die_with_a_parent_killed_outright(tmp_path, tiny_model_dir):
    """SIGKILL to `run --jobs 2` itself (no chance to stop its workers): the workers end too, rather than finishing
    their runs unseen and writing into a folder whose lock is gone."""
    import os
    import signal
    import subprocess
    import time

    write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu", "lora-nu-mu"], seeds=[0],
                     train={"general": {"max_steps": 100000, "batch_size": 4},
                            "domain": {"max_steps": 100000, "batch_size": 2}})
    proc = subprocess.Popen([sys.executable, "-m", "forgetless", "run", str(tmp_path / "exp.yaml"), "--jobs", "2",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        assert _workers_started(proc) == 2
        children = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        proc.kill()
        proc.wait(timeout=60)
        for _ in range(120):  # a hang guard: they end within a second or so
            alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                     and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
            if not alive:
                break
            time.sleep(0.5)
        assert not alive
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _block(folder: str) -> None:
    """A worker's task: says it started, then waits for ``release`` (two minutes at most) and says it finished."""
    import os
    import time
    from pathlib import Path

    (Path(folder) / f"started-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not (Path(folder) / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (Path(folder) / f"finished-{os.getpid()}").touch()


def test_ctrl_c_taken_by_another_thread_still_stops_the_workers(tmp_path):
    """SIGINT handled by a thread other than the main one (the kernel picks any thread of the process; the process
    pool has two of its own): the main thread, waiting for the workers, must still raise KeyboardInterrupt at once,
    not when a run ends (a wait without timeout only looks at signals when it returns). The workers' tasks end only
    when the test releases them, after the interrupt: a main thread that waited for them would see them finish."""
    import signal
    import threading
    import time

    from forgetless.experiment import _in_workers

    def fire() -> None:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # both workers have started (spawned: seconds)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this helper thread, not the main one

    # Python's own handler, whatever this process inherited: a shell starts background jobs with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=fire, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _in_workers(2, [(_block, (str(tmp_path),)), (_block, (str(tmp_path),))])
        assert len(list(tmp_path.glob("started-*"))) == 2 and not list(tmp_path.glob("finished-*"))
    finally:
        signal.signal(signal.SIGINT, previous)
        (tmp_path / "release").touch()  # a worker left running ends


def _killed():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer ends a worker


def _waits():
    import time

    time.sleep(3)


def test_a_worker_killed_outright_is_an_error_naming_what_was_left():
    """A worker that dies takes the pool's other work with it (concurrent.futures' broken pool): the error names the
    tasks left unfinished and says that `forgetless run` resumes, rather than a traceback naming nothing."""
    from forgetless.experiment import RunFailed, _in_workers

    with pytest.raises(RunFailed, match=r"a worker process ended abruptly .*not finished: (lora-mu__t__seed0|.*); .*"
                                        r"`forgetless run` again resumes") as caught:
        _in_workers(2, [(_killed, ()), (_waits, ())], names=["lora-mu__t__seed0", "replay__t__seed0"].__getitem__)
    assert "lora-mu__t__seed0" in str(caught.value)


def test_workers_take_their_gpus_from_the_visible_list():
    """With several GPUs each worker gets one: from the list the parent was given (a scheduler's CUDA_VISIBLE_DEVICES
    of 2,3 stays on physical GPUs 2 and 3), else by index."""
    from forgetless.experiment import worker_gpu

    assert [worker_gpu(n, 2, "2,3") for n in range(3)] == ["2", "3", "2"]
    assert [worker_gpu(n, 2, "GPU-a1, GPU-b2") for n in range(2)] == ["GPU-a1", "GPU-b2"]
    assert [worker_gpu(n, 4, None) for n in range(5)] == ["0", "1", "2", "3", "0"]
    assert worker_gpu(1, 2, "") == "1"
    assert [worker_gpu(n, 2, "2,3,7") for n in range(3)] == ["2", "3", "2"]  # torch counts 2: a bad third entry


def test_the_landscape_step_measures_recorded_runs_on_two_workers(tmp_path, tiny_model_dir, capsys):
    """Runs recorded before a landscape: section was added are measured by the step at the end, one run per worker."""
    landscape = {"blocks": 2, "grid": 3, "batch_size": 2, "hessian_iters": 1, "trace_samples": 1, "ascent_steps": 1}
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0, 1])
    run_experiment(load_experiment(path), progress=False)
    path = write_experiment(tmp_path, tiny_model_dir, methods=["lora-mu"], seeds=[0, 1], landscape=landscape)
    run_experiment(load_experiment(path), progress=False, jobs=2)
    assert "landscape: measuring 2 run(s) on 2 worker processes" in capsys.readouterr().out
    for record in (tmp_path / "out" / "runs").glob("*.json"):
        assert "hessian_trace" in json.loads(record.read_text())["landscape"]["metrics"]


def test_rerun_changed_on_workers_keeps_the_old_runs_in_place_when_the_data_fails(tmp_path, tiny_model_dir):
    """``--rerun-changed --jobs 2`` sets a changed run's record and adapter aside only when its worker has tokenized
    the data (as one process does): a data error found there leaves the finished runs where they were."""
    from forgetless.config import ConfigError
    from forgetless.data import DataError

    path = write_experiment(tmp_path, tiny_model_dir, methods=["base", "lora-mu"], seeds=[0])
    run_experiment(load_experiment(path), progress=False)
    out = tmp_path / "out"
    before = sorted(p.name for p in (out / "runs").iterdir()) + sorted(p.name for p in (out / "adapters").iterdir())
    exp = yaml.safe_load(path.read_text())
    exp["tasks"][0]["max_length"] = 1  # the runs change, and the answers no longer fit: an error at tokenization
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises((ConfigError, DataError, RuntimeError), match="no room for the question in max_length=1"):
        run_experiment(load_experiment(path), progress=False, rerun_changed=True, jobs=2)
    after = sorted(p.name for p in (out / "runs").iterdir()) + sorted(p.name for p in (out / "adapters").iterdir())
    assert after == before == ["base__gen__seed0.json", "lora-mu__gen__seed0.json", "lora-mu__gen__seed0"]
