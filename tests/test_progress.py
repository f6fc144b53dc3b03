"""staralign.progress: plain lines without a terminal (each tenth, every 30 s), bars with one."""

from __future__ import annotations

import io

import pytest

from staralign.progress import Progress, format_duration, mode_for


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines_progress(total, clock, **kw):
    out = io.StringIO()
    return Progress(total, "epoch 1/8", "step", stream=out, mode="lines", clock=clock, heartbeat=False, **kw), out


def test_plain_lines_at_each_tenth_with_rate_elapsed_remaining_and_loss():
    clock = FakeClock()
    bar, out = lines_progress(100, clock)
    for _ in range(100):
        clock.t += 0.5
        bar.set_postfix(loss="1.2345")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per tenth; the last one is the final count, not repeated at close
    assert lines[0] == "epoch 1/8: 10/100 steps (10%), 2 steps/s, 0:05 elapsed, 0:45 left, loss 1.2345"
    assert lines[-1].startswith("epoch 1/8: 100/100 steps (100%), 2 steps/s, 0:50 elapsed, loss 1.2345")


def test_a_line_at_least_every_interval_even_between_tenths():
    clock = FakeClock()
    bar, out = lines_progress(1000, clock)
    for _ in range(40):  # 40 slow steps: 4% of the total, no tenth crossed
        clock.t += 10
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 13  # 400 s at one line per 30 s
    assert "12 steps/s" not in out.getvalue() and "10 s/step" in out.getvalue()


def test_heartbeat_tick_speaks_while_one_step_runs_long():
    clock = FakeClock()
    bar, out = lines_progress(10, clock)
    clock.t += 29
    bar.tick()
    assert out.getvalue() == ""
    clock.t += 2
    bar.tick()
    assert out.getvalue() == "epoch 1/8: 0/10 steps (0%), 0:31 elapsed\n"
    bar.close()
    bar.tick()  # closed: silent
    assert len(out.getvalue().splitlines()) == 1


def test_heartbeat_thread_writes_on_its_own():
    out = io.StringIO()
    bar = Progress(5, "synth", "face", stream=out, mode="lines", interval=0.05)
    import time

    time.sleep(0.3)
    bar.close()
    assert "synth: 0/5 faces" in out.getvalue()


def test_resumed_count_and_unknown_total():
    clock = FakeClock()
    bar, out = lines_progress(10, clock, initial=5)
    clock.t += 4
    bar.update(1)
    assert out.getvalue().startswith("epoch 1/8: 6/10 steps (60%), 4 s/step, 0:04 elapsed, 0:16 left")
    bar, out = lines_progress(None, clock, interval=1)
    clock.t += 2
    bar.update(3)
    assert out.getvalue() == "epoch 1/8: 3 steps, 1.5 steps/s, 0:02 elapsed\n"


def test_disabled_writes_nothing():
    out = io.StringIO()
    bar = Progress(3, "x", stream=out, enabled=False)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("STARALIGN_PROGRESS", raising=False)
    assert mode_for(io.StringIO()) == "lines"
    assert mode_for(Tty()) == "bar"
    for value, mode in (("lines", "lines"), ("off", "off"), ("0", "off"), ("1", "bar"), ("bar", "bar")):
        monkeypatch.setenv("STARALIGN_PROGRESS", value)
        assert mode_for(Tty()) == mode


def test_bar_on_a_terminal():
    out = io.StringIO()
    with Progress(4, "evaluating", "face", stream=out, mode="bar") as bar:
        bar.update(4)
    assert "evaluating:" in out.getvalue() and "/4 [" in out.getvalue()  # a tqdm bar, not a line


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (61.4, "1:01"), (3725, "1:02:05")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
