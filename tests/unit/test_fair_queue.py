"""The order admission lets held requests through, and the headroom control, as pure logic:
priority first, users of one priority in turn weighted by tokens asked (property-based), and the
share of capacity lower tiers may fill adapting to a protected tier's time to first token."""

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.fair_queue import FairQueue
from proxy.headroom import HeadroomControl

held = st.lists(
    st.tuples(st.sampled_from([0, 5, 9]), st.sampled_from("abcd"), st.integers(1, 1000)),
    min_size=1,
    max_size=60,
)


def drain(queue: FairQueue[int]) -> list[int]:
    order = []
    while queue.peek() is not None:
        order.append(queue.pop())
    return order


@settings(max_examples=200, deadline=None)
@given(held)
def test_better_priorities_always_go_first_and_nothing_is_lost(items: list[tuple[int, str, int]]) -> None:
    queue: FairQueue[int] = FairQueue()
    for i, (priority, user, cost) in enumerate(items):
        queue.push(i, priority=priority, user=user, cost=cost)
    order = drain(queue)
    assert sorted(order) == list(range(len(items)))
    priorities = [items[i][0] for i in order]
    assert priorities == sorted(priorities)
    assert len(queue) == 0


@settings(max_examples=200, deadline=None)
@given(held)
def test_one_users_requests_keep_their_order(items: list[tuple[int, str, int]]) -> None:
    queue: FairQueue[int] = FairQueue()
    for i, (priority, user, cost) in enumerate(items):
        queue.push(i, priority=priority, user=user, cost=cost)
    order = drain(queue)
    for user in "abcd":
        for priority in (0, 5, 9):
            mine = [i for i in order if items[i][1:2] == (user,) and items[i][0] == priority]
            assert mine == sorted(mine)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(1, 2000), st.integers(0, 50))
def test_a_single_request_waits_behind_at_most_one_of_a_busy_users(busy: int, cost: int, served: int) -> None:
    """However many equal requests one user holds, and however many of them already went, a second
    user's single request of the same cost goes out after at most one more of them."""
    queue: FairQueue[str] = FairQueue()
    for i in range(busy):
        queue.push(f"busy-{i}", priority=7, user="busy", cost=cost)
    for _ in range(min(served, busy - 1)):
        queue.pop()
    queue.push("single", priority=7, user="quiet", cost=cost)
    order = drain(queue)
    assert order.index("single") <= 1


def test_weights_are_the_tokens_asked() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(6):
        queue.push(f"small-{i}", priority=0, user="small", cost=100)
    for i in range(2):
        queue.push(f"big-{i}", priority=0, user="big", cost=300)
    order = drain(queue)
    assert order[:5] == ["small-0", "big-0", "small-1", "small-2", "small-3"]


def test_take_and_remove_leave_the_others_in_order() -> None:
    queue: FairQueue[str] = FairQueue()
    for name, user in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b")]:
        queue.push(name, priority=3, user=user, cost=10)
    queue.remove("b1")
    queue.remove("gone")
    queue.take("a1")
    assert len(queue) == 2 and queue.best_priority() == 3
    assert drain(queue) == ["a2", "b2"]
    assert queue.best_priority() is None


def test_headroom_control_backs_off_on_misses_and_grows_back() -> None:
    control = HeadroomControl(objective_s=0.5, min_share=0.25, backoff=0.5, step=0.1)
    assert control.limit(8, 1) == 7
    for _ in range(99):
        control.observe(0.1)
    control.observe(0.9)
    control.adapt()
    assert control.share == 1.0, "1 miss in 100 is a met p99"
    control.observe(0.1)
    control.observe(0.9)
    control.adapt()
    assert control.share == 0.5 and control.limit(8, 1) == 4 and not control.unattainable
    control.observe(0.9)
    control.adapt()
    control.observe(0.9)
    control.adapt()
    assert control.share == 0.25 and control.unattainable
    control.adapt()
    assert control.share == 0.35 and not control.unattainable, "an idle interval gives some back"
    assert control.limit(2, 3) == 0
