"""simulation/delivery.py: the Simulation Runtime's message thread wakes
on a push instead of on Flower's 0.1 s tick, delivers what Flower's would, and
is swapped in only around the launcher's simulation and only for flwr 1.41.0."""
import queue
import threading
import time

import pytest

from simulation import delivery as pd


class _Meta:
    def __init__(self, dst):
        self.dst_node_id = dst


class _Msg:
    def __init__(self, dst, n):
        self.metadata, self.n = _Meta(dst), n


class FakeState:
    """The two LinkState methods the thread uses: messages stored per node,
    handed out one per call, each once."""

    def __init__(self):
        self.pending, self.lock, self.polls = [], threading.Lock(), 0

    def store_message_ins(self, message):
        with self.lock:
            self.pending.append(message)
        return str(message.n)

    def get_message_ins(self, node_id, limit):
        with self.lock:
            self.polls += 1
            mine = [m for m in self.pending if m.metadata.dst_node_id == node_id][:limit]
            for m in mine:
                self.pending.remove(m)
        return mine


@pytest.fixture
def running(monkeypatch):
    """The thread over a FakeState of nodes 1-3, with a 60 s idle tick: a
    message that arrives within seconds came because of the push."""
    monkeypatch.setattr(pd, "IDLE_S", 60.0)
    state, q, stop = FakeState(), queue.Queue(), threading.Event()
    th = threading.Thread(target=pd.add_messages_when_pushed,
                          args=(state, q, {1: 0, 2: 1, 3: 2}, stop), daemon=True)
    th.start()
    yield state, q, stop, th
    stop.set()
    state.store_message_ins(_Msg(99, -1))  # wake it so it sees the stop


def _take(q, n, wait_s=10.0):
    end, got = time.monotonic() + wait_s, []
    while len(got) < n and time.monotonic() < end:
        try:
            got.append(q.get(timeout=0.05))
        except queue.Empty:
            pass
    return got


def test_a_push_wakes_the_thread_and_every_message_arrives_once(running):
    state, q, _, _ = running
    time.sleep(0.2)  # the thread is idle now, in its 60 s wait
    polls = state.polls
    for n, dst in enumerate([2, 1, 2, 3, 2]):  # node 2 gets three messages
        state.store_message_ins(_Msg(dst, n))
    got = _take(q, 5)
    assert sorted(m.n for m in got) == [0, 1, 2, 3, 4]  # all, well before the 60 s tick
    assert state.polls > polls
    # node 2's messages in the order pushed
    assert [m.n for m in got if m.metadata.dst_node_id == 2] == [0, 2, 4]
    assert q.empty() and not state.pending


def test_idle_thread_does_not_spin(running):
    state, _, _, _ = running
    time.sleep(0.2)
    polls = state.polls
    time.sleep(0.5)
    assert state.polls == polls  # no push, no pass before the tick


def test_stop_ends_the_thread_and_gives_the_state_its_method_back(running):
    state, _, stop, th = running
    assert "store_message_ins" in vars(state)  # wrapped on the instance
    stop.set()
    state.store_message_ins(_Msg(99, -1))
    th.join(timeout=10)
    assert not th.is_alive()
    assert "store_message_ins" not in vars(state)


def test_swapped_only_inside_the_block_and_only_for_the_known_flower(monkeypatch, caplog):
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with caplog.at_level("WARNING", logger=pd.log.name):
        with pd.prompt_delivery() as swapped:
            assert swapped and vce_api.add_messages_to_queue is pd.add_messages_when_pushed
        assert vce_api.add_messages_to_queue is original
        assert not caplog.records  # the known Flower: nothing to say
        monkeypatch.setattr(flwr, "__version__", "9.9.9")
        with pd.prompt_delivery() as swapped:
            assert not swapped and vce_api.add_messages_to_queue is original
    # another Flower: the user is told the rounds wait for Flower's tick
    assert [r.getMessage() for r in caplog.records] == [
        "runtime.prompt_delivery: flwr 9.9.9's message thread is not the one of flwr "
        "1.41.0; messages wait for Flower's own tick (slower rounds, same results)"]


def test_the_thread_function_flower_starts_has_the_arguments_we_replace():
    from flwr.server.superlink.fleet.vce import vce_api

    assert pd._swappable(vce_api)
