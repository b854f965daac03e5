"""Multi-step handlers (router.py rule 4): ``@router.on(type, lifecycle=L)`` runs the first step
in ``claimed``, ``@router.on(type, step=S)`` each later working state of ``L``. ``handlers()``
gives the first step's spec with the others in ``steps``, checks that every working state has a
handler, and every mistake is a :class:`RouterError` raised while the router is built."""

from __future__ import annotations

from typing import Any

import pytest

from pgoutbox import RetryPolicy, RouterError, WorkflowRouter
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE, Lifecycle
from pgoutbox.router import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY

# Working states: claimed, reserved, shipped. awaiting_payment is parking: no handler runs there.
ORDER = Lifecycle.define(
    "order",
    states=["reserved", "awaiting_payment", "shipped"],
    parking=["awaiting_payment"],
    transitions=[
        {"trigger": "reserve", "source": "claimed", "dest": "reserved"},
        {"trigger": "bill", "source": "reserved", "dest": "awaiting_payment"},
        {"trigger": "paid", "source": "awaiting_payment", "dest": "shipped"},
        {"trigger": "expire", "source": "awaiting_payment", "dest": "cancelled"},
        {"trigger": "deliver", "source": "shipped", "dest": "succeeded"},
    ],
)
# Another lifecycle with the same name as ORDER: one more state, so another digest.
ORDER_TWIN = Lifecycle.define(
    "order",
    states=["reserved"],
    transitions=[
        {"trigger": "reserve", "source": "claimed", "dest": "reserved"},
        {"trigger": "deliver", "source": "reserved", "dest": "succeeded"},
    ],
)
# A differently named lifecycle sharing ORDER's 'reserved' working state.
RETURNS = Lifecycle.define(
    "returns",
    states=["reserved"],
    transitions=[
        {"trigger": "reserve", "source": "claimed", "dest": "reserved"},
        {"trigger": "refund", "source": "reserved", "dest": "succeeded"},
    ],
)


async def take_order(ctx: Any, payload: Any) -> str:
    return "reserve"


async def reserve_stock(ctx: Any, payload: Any) -> str:
    return "bill"


async def ship(ctx: Any, payload: Any) -> str:
    return "deliver"


async def another(ctx: Any, payload: Any) -> str:
    return "deliver"


def _complete(router: WorkflowRouter, operation_type: str = "order", **first: Any) -> None:
    """Register all three steps of ORDER for ``operation_type``."""
    router.on(operation_type, lifecycle=ORDER, **first)(take_order)
    router.on(operation_type, step="reserved")(reserve_stock)
    router.on(operation_type, step="shipped")(ship)


def test_handlers_give_the_first_step_with_the_later_ones_in_steps() -> None:
    router = WorkflowRouter()
    _complete(router)

    handlers = router.handlers()

    assert list(handlers) == ["order"]
    first = handlers["order"]
    assert (first.step, first.fn, first.operation_type) == ("claimed", take_order, "order")
    assert first.lifecycle is ORDER
    assert set(first.steps) == {"reserved", "shipped"}
    assert first.steps["reserved"].fn is reserve_stock
    assert first.steps["shipped"].fn is ship
    # Every later step knows its own state, type and the lifecycle, and has no steps of its own.
    for state, spec in first.steps.items():
        assert (spec.step, spec.operation_type, spec.lifecycle) == (state, "order", ORDER)
        assert spec.steps == {}


def test_for_step_finds_each_working_states_spec() -> None:
    router = WorkflowRouter()
    _complete(router)
    first = router.handlers()["order"]

    assert first.for_step("claimed") is first
    assert first.for_step("reserved").fn is reserve_stock
    assert first.for_step("shipped").fn is ship
    assert {first.for_step(s).step for s in ORDER.working} == ORDER.working


def test_a_default_lifecycle_type_has_one_step_and_no_steps() -> None:
    router = WorkflowRouter()
    router.on("plain")(another)
    spec = router.handlers()["plain"]
    assert (spec.step, spec.lifecycle, spec.steps) == ("claimed", DEFAULT_LIFECYCLE, {})
    assert spec.for_step("claimed") is spec


def test_each_step_resolves_its_own_options() -> None:
    router = WorkflowRouter(max_attempts=4, on_lost="dead")
    slow = RetryPolicy(base_seconds=10, max_seconds=60)
    router.on("order", lifecycle=ORDER, transactional=True)(take_order)
    router.on("order", step="reserved", max_attempts=2, on_lost="retry", retry=slow)(reserve_stock)
    router.on("order", step="shipped")(ship)

    first = router.handlers()["order"]
    reserved, shipped = first.for_step("reserved"), first.for_step("shipped")

    # The first step: its own transactional flag, the router's max_attempts and on_lost.
    assert (first.transactional, first.max_attempts, first.on_lost, first.retry) == (
        True,
        4,
        "dead",
        DEFAULT_RETRY,
    )
    # A step's own options override the router's, and do not leak into the other steps.
    assert (reserved.transactional, reserved.max_attempts, reserved.on_lost, reserved.retry) == (
        False,
        2,
        "retry",
        slow,
    )
    assert (shipped.transactional, shipped.max_attempts, shipped.on_lost, shipped.retry) == (
        False,
        4,
        "dead",
        DEFAULT_RETRY,
    )


def test_steps_without_router_options_get_the_library_defaults() -> None:
    router = WorkflowRouter()
    _complete(router, max_attempts=9)
    first = router.handlers()["order"]
    assert first.max_attempts == 9
    for state in ("reserved", "shipped"):
        assert first.for_step(state).max_attempts == DEFAULT_MAX_ATTEMPTS
        assert first.for_step(state).on_lost == "retry"


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["awaiting_payment", "pending", "failed", "succeeded", "nowhere"])
def test_a_step_that_is_not_a_working_state_of_the_lifecycle_is_refused(step: str) -> None:
    router = WorkflowRouter()
    with pytest.raises(
        RouterError,
        match=rf"handler 'order': '{step}' is not a working state of lifecycle 'order' "
        r"\(working states: claimed, reserved, shipped\)",
    ):
        router.on("order", lifecycle=ORDER, step=step)


def test_a_step_of_a_known_lifecycle_that_is_not_working_is_refused_at_registration() -> None:
    # The lifecycle was said on the first step; the bad step handler names none itself.
    router = WorkflowRouter()
    router.on("order", lifecycle=ORDER)(take_order)
    with pytest.raises(
        RouterError,
        match=r"handler ship runs step 'awaiting_payment', but lifecycle 'order' has no such "
        r"working state",
    ):
        router.on("order", step="awaiting_payment")(ship)
    # The refused handler was not kept: completing the router leaves no trace of it.
    router.on("order", step="reserved")(reserve_stock)
    router.on("order", step="shipped")(ship)
    assert set(router.handlers()["order"].steps) == {"reserved", "shipped"}


def test_step_on_a_default_lifecycle_type_is_refused_once_the_router_is_complete() -> None:
    router = WorkflowRouter()
    router.on("plain")(another)
    # Allowed while building: the lifecycle may still be declared by a later registration.
    router.on("plain", step="shipped")(ship)
    with pytest.raises(
        RouterError,
        match=r"operation type 'plain': handler ship runs step 'shipped', but lifecycle "
        r"'default' has no such working state \(working states: claimed\)",
    ):
        router.handlers()


@pytest.mark.parametrize("step", ["", None, 3])
def test_a_step_that_is_not_a_state_name_is_refused(step: Any) -> None:
    with pytest.raises(RouterError, match=rf"handler 'order': invalid step {step!r}"):
        WorkflowRouter().on("order", lifecycle=ORDER, step=step)


def test_an_incomplete_router_may_be_built_but_handlers_names_the_missing_steps() -> None:
    router = WorkflowRouter()
    router.on("order", lifecycle=ORDER)(take_order)  # registration alone is allowed

    with pytest.raises(
        RouterError,
        match=r"operation type 'order' \(lifecycle 'order'\) has no handler for step\(s\) "
        r"'reserved', 'shipped'",
    ):
        router.handlers()

    router.on("order", step="reserved")(reserve_stock)
    with pytest.raises(RouterError, match=r"has no handler for step\(s\) 'shipped':"):
        router.handlers()

    router.on("order", step="shipped")(ship)
    assert set(router.handlers()["order"].steps) == {"reserved", "shipped"}


def test_a_missing_first_step_is_named_too() -> None:
    router = WorkflowRouter()
    router.on("order", lifecycle=ORDER, step="reserved")(reserve_stock)
    router.on("order", step="shipped")(ship)
    with pytest.raises(RouterError, match=r"has no handler for step\(s\) 'claimed':"):
        router.handlers()


def test_two_handlers_for_the_same_step_are_refused() -> None:
    router = WorkflowRouter()
    _complete(router)
    with pytest.raises(
        RouterError,
        match=r"operation type 'order' already has a handler for step 'shipped' \(ship\)",
    ):
        router.on("order", step="shipped")(another)
    assert router.handlers()["order"].for_step("shipped").fn is ship


def test_the_same_step_from_two_included_routers_is_refused() -> None:
    app = WorkflowRouter()
    _complete(app, "billing.order")
    billing = WorkflowRouter(prefix="billing")
    # billing must know the lifecycle itself: a router checks each step as it is registered.
    billing.on("order", step="shipped", lifecycle=ORDER)(another)
    with pytest.raises(
        RouterError,
        match=r"'billing\.order' has two handlers for step 'shipped': ship and another",
    ):
        app.include_router(billing)
    # Nothing was included.
    assert app.handlers()["billing.order"].for_step("shipped").fn is ship


def test_handlers_of_one_type_declaring_two_lifecycles_are_refused() -> None:
    router = WorkflowRouter()
    router.on("order", lifecycle=ORDER)(take_order)
    with pytest.raises(
        RouterError,
        match=r"operation type 'order': its handlers declare different lifecycles "
        r"\(order, returns\)",
    ):
        router.on("order", step="reserved", lifecycle=RETURNS)(reserve_stock)
    # Not kept: the step can still be registered, and the type keeps ORDER.
    router.on("order", step="reserved")(reserve_stock)
    router.on("order", step="shipped")(ship)
    assert router.handlers()["order"].lifecycle is ORDER


def test_handlers_of_one_type_declaring_two_lifecycles_with_one_name_are_refused() -> None:
    router = WorkflowRouter()
    router.on("order", lifecycle=ORDER)(take_order)
    with pytest.raises(RouterError, match=r"declare different lifecycles \(order, order\)"):
        router.on("order", step="reserved", lifecycle=ORDER_TWIN)(reserve_stock)


def test_the_same_lifecycle_on_several_handlers_of_a_type_is_fine() -> None:
    router = WorkflowRouter()
    router.on("order", lifecycle=ORDER)(take_order)
    router.on("order", step="reserved", lifecycle=ORDER)(reserve_stock)
    # An equal definition declared again (another object, same digest) is the same lifecycle.
    again = Lifecycle.from_definition(ORDER.definition())
    router.on("order", step="shipped", lifecycle=again)(ship)
    assert router.handlers()["order"].lifecycle.digest == ORDER.digest


def test_two_different_lifecycles_named_alike_on_two_types_are_refused() -> None:
    router = WorkflowRouter()
    _complete(router)
    with pytest.raises(
        RouterError, match=r"two different lifecycles are both named 'order'; give each"
    ):
        router.on("order_lite", lifecycle=ORDER_TWIN)(another)
    assert list(router.handlers()) == ["order"]


def test_lifecycles_named_alike_meeting_through_include_router_are_refused() -> None:
    app = WorkflowRouter()
    _complete(app)
    lite = WorkflowRouter(prefix="lite")
    lite.on("order", lifecycle=ORDER_TWIN)(take_order)
    lite.on("order", step="reserved")(reserve_stock)
    assert set(lite.handlers()) == {"lite.order"}  # fine on its own

    with pytest.raises(RouterError, match=r"two different lifecycles are both named 'order'"):
        app.include_router(lite)
    assert list(app.handlers()) == ["order"]


def test_one_lifecycle_shared_by_two_types_is_fine() -> None:
    router = WorkflowRouter()
    _complete(router, "order")
    _complete(router, "order_express")
    handlers = router.handlers()
    assert {t: h.lifecycle for t, h in handlers.items()} == {
        "order": ORDER,
        "order_express": ORDER,
    }


@pytest.mark.parametrize("lifecycle", ["order", ORDER.definition(), object()])
def test_lifecycle_that_is_not_a_lifecycle_is_refused(lifecycle: Any) -> None:
    with pytest.raises(
        RouterError, match=r"handler 'order': lifecycle must be a Lifecycle \(Lifecycle\.define"
    ):
        WorkflowRouter().on("order", lifecycle=lifecycle)


# -- building order and composition ------------------------------------------------------------


def test_the_lifecycle_may_be_declared_after_the_steps_and_in_a_parent_router() -> None:
    child = WorkflowRouter(prefix="shop")
    child.on("order", step="shipped")(ship)
    child.on("order", step="reserved")(reserve_stock)
    parent = WorkflowRouter()
    parent.include_router(child)
    parent.on("shop.order", lifecycle=ORDER)(take_order)

    first = parent.handlers()["shop.order"]

    assert (first.step, first.fn, first.lifecycle) == ("claimed", take_order, ORDER)
    assert {s: spec.fn for s, spec in first.steps.items()} == {
        "reserved": reserve_stock,
        "shipped": ship,
    }
    assert all(spec.lifecycle == ORDER for spec in first.steps.values())


def test_a_complete_router_needs_the_first_step_of_every_type() -> None:
    router = WorkflowRouter()
    router.on("order", step="shipped", lifecycle=ORDER)(ship)
    router.on("order", step="reserved")(reserve_stock)
    with pytest.raises(
        RouterError, match=r"'order' \(lifecycle 'order'\) has no handler for step\(s\) 'claimed'"
    ):
        router.handlers()


def test_steps_may_be_registered_before_the_first_step() -> None:
    # The lifecycle is said on the first handler registered, whichever step that is.
    router = WorkflowRouter()
    router.on("order", step="shipped", lifecycle=ORDER)(ship)
    router.on("order", step="reserved")(reserve_stock)
    router.on("order")(take_order)

    first = router.handlers()["order"]

    assert (first.step, first.fn) == ("claimed", take_order)
    assert {s: spec.fn for s, spec in first.steps.items()} == {
        "reserved": reserve_stock,
        "shipped": ship,
    }


def test_steps_are_composed_through_include_router_with_prefixes() -> None:
    shop = WorkflowRouter(prefix="shop", max_attempts=3)
    _complete(shop)
    api = WorkflowRouter(prefix="api", on_lost="dead")
    api.include_router(shop, prefix="v2")
    app = WorkflowRouter()
    app.include_router(api, prefix="eu")

    handlers = app.handlers()

    assert list(handlers) == ["eu.api.v2.shop.order"]
    first = handlers["eu.api.v2.shop.order"]
    assert first.fn is take_order
    assert {s: spec.fn for s, spec in first.steps.items()} == {
        "reserved": reserve_stock,
        "shipped": ship,
    }
    # Every step carries the full type and the options inherited along the way.
    for state in ORDER.working:
        spec = first.for_step(state)
        assert spec.operation_type == "eu.api.v2.shop.order"
        assert (spec.max_attempts, spec.on_lost, spec.lifecycle) == (3, "dead", ORDER)
    # The included routers keep their own view.
    assert list(shop.handlers()) == ["shop.order"]
    assert shop.handlers()["shop.order"].on_lost == "retry"


def test_steps_split_across_routers_meet_under_one_full_type() -> None:
    # The first step in one router, the later ones (declaring the lifecycle themselves)
    # in another; the full types only meet in the app.
    first = WorkflowRouter()
    first.on("shop.order", lifecycle=ORDER)(take_order)
    later = WorkflowRouter(prefix="shop")
    later.on("order", step="reserved", lifecycle=ORDER)(reserve_stock)
    later.on("order", step="shipped")(ship)
    app = WorkflowRouter()
    app.include_router(first)
    app.include_router(later)

    spec = app.handlers()["shop.order"]

    assert (spec.step, spec.fn) == ("claimed", take_order)
    assert set(spec.steps) == {"reserved", "shipped"}
