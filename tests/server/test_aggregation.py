import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_dp_lightning.server.aggregate import RunningAverage, fedavg


def test_unweighted_fedavg_is_the_elementwise_mean():
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor(4.0)}
    b = {"w": torch.tensor([3.0, 6.0, 9.0]), "b": torch.tensor(0.0)}
    out = fedavg([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0, 6.0]))
    assert torch.equal(out["b"], torch.tensor(2.0))


def test_weighted_fedavg_matches_a_hand_computation():
    a = {"w": torch.tensor([[1.0, 0.0], [2.0, -1.0]])}
    b = {"w": torch.tensor([[4.0, 3.0], [-1.0, 5.0]])}
    # weights 1 and 3: (1*a + 3*b) / 4
    expected = torch.tensor([[(1 + 12) / 4, (0 + 9) / 4], [(2 - 3) / 4, (-1 + 15) / 4]])
    assert torch.allclose(fedavg([a, b], [1, 3])["w"], expected)


def test_integer_buffers_come_from_the_first_state_and_inputs_are_untouched():
    a = {"w": torch.tensor([1.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0]), "n": torch.tensor(9)}
    before = {k: v.clone() for k, v in a.items()}
    out = fedavg([a, b], [1, 1])
    assert out["n"].item() == 5 and out["n"].dtype == torch.int64
    assert all(torch.equal(a[k], before[k]) for k in a)


def test_bad_weights_are_refused():
    s = {"w": torch.ones(1)}
    with pytest.raises(ValueError, match="weights"):
        fedavg([s, s], [0, 0])
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        fedavg([s, s], [1])


vectors = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(values=vectors, copies=st.integers(1, 5), weights=st.lists(st.floats(0.1, 1e4), min_size=5, max_size=5))
def test_fedavg_of_identical_states_is_that_state(values, copies, weights):
    state = {"w": torch.tensor(values, dtype=torch.float32)}
    out = fedavg([state] * copies, weights[:copies])
    assert torch.equal(out["w"], state["w"])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=5),
    weights=st.lists(st.integers(1, 1000), min_size=5, max_size=5),
)
def test_running_average_equals_fedavg(rows, weights):
    states = [{"w": torch.tensor(r)} for r in rows]
    running = RunningAverage()
    for s, w in zip(states, weights):
        running.add(s, w)
    expected = fedavg(states, weights[: len(states)])
    assert torch.allclose(running.result(states[0])["w"], expected["w"], atol=1e-6, rtol=0)


def test_running_average_restricted_to_parameters_keeps_buffers_at_the_global_value():
    global_state = {"w": torch.tensor([0.0, 0.0]), "running_mean": torch.tensor([5.0])}
    clients = [
        {"w": torch.tensor([1.0, 2.0]), "running_mean": torch.tensor([9.0])},
        {"w": torch.tensor([3.0, 6.0]), "running_mean": torch.tensor([-7.0])},
    ]
    running = RunningAverage(only={"w"})
    for state, weight in zip(clients, [1, 3]):
        running.add(state, weight)
    out = running.result(global_state)
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))  # (1*1 + 3*3) / 4, (2 + 18) / 4
    assert torch.equal(out["running_mean"], global_state["running_mean"])  # never averaged, never released


def test_combining_two_processes_partial_sums_equals_one_running_average_of_all_clients():
    from fl_dp_lightning.server.aggregate import combine_processes

    template = {"w": torch.zeros(3), "b": torch.zeros(2)}
    clients = [{"w": torch.randn(3), "b": torch.randn(2)} for _ in range(3)]
    both = RunningAverage()
    for state, weight in zip(clients, (1.0, 2.0, 3.0)):
        both.add(state, weight)
    first, second = RunningAverage(), RunningAverage()
    first.add(clients[0], 1.0)
    for state, weight in zip(clients[1:], (2.0, 3.0)):
        second.add(state, weight)
    theirs = torch.cat([second.summed["w"], second.summed["b"], torch.tensor([5.0], dtype=torch.float64)])
    combine_processes(first, template, lambda flat: flat.add_(theirs))  # the other process's sum arrives
    assert first.total_weight == both.total_weight
    for key, value in both.result(template).items():
        torch.testing.assert_close(first.result(template)[key], value, rtol=0, atol=1e-12)
