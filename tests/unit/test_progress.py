"""Progress outside a terminal: a plain line at an interval, not one line per item (issue #14 item 3)."""

import io

import forgetless.progress as progress_mod
from forgetless.progress import progress


class _Clock:
    """time.perf_counter stand-in: each call advances by ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_plain_lines_at_interval_outside_terminal(monkeypatch):
    clock = _Clock(1.0)  # each item "takes" about a second
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    out = io.StringIO()  # not a tty
    items = list(range(100))
    assert list(progress(items, "multiple choice", unit="batch", interval=30, stream=out)) == items
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # ~100 s of work at one line per 30 s: 3 interval lines and a closing one, not 100
    assert 3 <= len(lines) <= 5, lines
    assert lines[0].startswith("multiple choice: ") and "/100 batch (" in lines[0]
    assert lines[-1].startswith("multiple choice: 100/100 batch (100%)") and lines[-1].endswith(", done")


def test_short_loops_and_disabled_are_silent(monkeypatch):
    monkeypatch.setattr(progress_mod.time, "perf_counter", _Clock(0.001))
    out = io.StringIO()
    assert list(progress(range(5), "perplexity", stream=out)) == list(range(5))
    assert out.getvalue() == ""
    items = [1, 2, 3]
    assert progress(items, "x", enabled=False, stream=out) is items


def test_terminal_gets_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    assert list(progress(range(3), "loss surface", unit="point", stream=out)) == [0, 1, 2]
    assert "loss surface" in out.getvalue() and "3/3" in out.getvalue()


def test_plain_lines_on_a_terminal_led_by_a_prefix(monkeypatch, capsys):
    """Worker processes sharing a terminal (``run --jobs``): plain lines, each naming its run, for evaluation loops
    and training stages alike; outside the context the terminal gets its bar again."""
    from forgetless.progress import plain_lines
    from forgetless.training.logging import StageLog

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress_mod.time, "perf_counter", _Clock(1.0))
    out = Tty()
    with plain_lines("[lora-mu__t__seed0] "):
        assert list(progress(range(100), "multiple choice", unit="batch", interval=30, stream=out)) == list(range(100))
        log = StageLog("domain", total=20, first=0, progress=True, trackers=[])
        log.step(100)
        log.write([{"step": 10, "loss": 2.5, "lr": 1e-3}])
        log.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines and all(l.startswith("[lora-mu__t__seed0] multiple choice: ")
                                                         for l in lines)
    err = capsys.readouterr().err
    assert err.startswith("[lora-mu__t__seed0] train domain: step 10/20 loss 2.5000 lr 0.001 ")
    out = Tty()
    assert list(progress(range(3), "loss surface", unit="point", stream=out)) == [0, 1, 2]
    assert "3/3" in out.getvalue()  # a bar again


def test_say_writes_a_whole_line_at_once():
    """Lines of several worker processes share a pipe: each must reach it in one write (print writes the newline
    apart, and two workers' lines then came out as one line and an empty one)."""
    from forgetless.progress import say

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes, self.flushes = [], 0

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

        def flush(self):
            self.flushes += 1

    out = Recorder()
    say("[worker 0] lora-mu__t__seed0", out)
    assert out.writes == ["[worker 0] lora-mu__t__seed0\n"] and out.flushes == 1
