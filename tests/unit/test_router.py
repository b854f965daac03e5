"""WorkflowRouter composition rules (pgoutbox/router.py module docstring): prefixes, option
inheritance, and the errors raised while the router is built rather than when work arrives."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from pgoutbox import RetryPolicy, RouterError, Settings, WorkflowRouter, WorkflowSystem
from pgoutbox.router import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY


async def _noop(ctx: Any, payload: Any) -> None:
    return None


async def _other(ctx: Any, payload: Any) -> None:
    return None


def _types(router: WorkflowRouter) -> list[str]:
    return sorted(router.handlers())


# -- prefixes ----------------------------------------------------------------------------------


def test_handler_type_is_its_name_when_no_router_has_a_prefix() -> None:
    router = WorkflowRouter()
    router.on("charge")(_noop)
    assert _types(router) == ["charge"]


def test_router_prefix_is_dot_joined_before_the_handler_name() -> None:
    router = WorkflowRouter(prefix="billing")
    router.on("charge")(_noop)
    assert _types(router) == ["billing.charge"]


def test_include_prefix_comes_before_the_included_routers_own_prefix() -> None:
    billing = WorkflowRouter(prefix="billing")
    billing.on("charge")(_noop)
    app = WorkflowRouter()
    app.include_router(billing, prefix="v2")
    assert _types(app) == ["v2.billing.charge"]


def test_nested_prefixes_join_outermost_first() -> None:
    billing = WorkflowRouter(prefix="billing")
    billing.on("charge")(_noop)
    api = WorkflowRouter(prefix="api")
    api.include_router(billing, prefix="v2")
    app = WorkflowRouter(prefix="app")
    app.include_router(api, prefix="eu")
    app.on("ping")(_other)
    assert _types(app) == ["app.eu.api.v2.billing.charge", "app.ping"]
    # The included routers keep their own view of the world.
    assert _types(api) == ["api.v2.billing.charge"]
    assert _types(billing) == ["billing.charge"]


def test_dotted_prefixes_and_names_are_joined_as_they_are() -> None:
    inner = WorkflowRouter(prefix="billing.cards")
    inner.on("charge.capture")(_noop)
    app = WorkflowRouter()
    app.include_router(inner, prefix="eu.v1")
    assert _types(app) == ["eu.v1.billing.cards.charge.capture"]


def test_the_same_router_can_be_included_twice_under_different_prefixes() -> None:
    email = WorkflowRouter(prefix="email")
    email.on("send")(_noop)
    app = WorkflowRouter()
    app.include_router(email, prefix="eu")
    app.include_router(email, prefix="us")
    assert _types(app) == ["eu.email.send", "us.email.send"]


def test_handlers_registered_after_inclusion_are_seen_by_the_including_router() -> None:
    child = WorkflowRouter(prefix="child")
    app = WorkflowRouter()
    app.include_router(child)
    child.on("late")(_noop)
    assert _types(app) == ["child.late"]


def test_the_handler_spec_carries_the_registered_function_and_transactional_flag() -> None:
    router = WorkflowRouter(prefix="p")
    router.on("t", transactional=True)(_noop)
    router.on("n")(_other)
    specs = router.handlers()
    assert specs["p.t"].fn is _noop
    assert specs["p.t"].transactional is True
    assert specs["p.n"].fn is _other
    assert specs["p.n"].transactional is False


def test_on_returns_the_handler_unchanged() -> None:
    router = WorkflowRouter()
    assert router.on("charge")(_noop) is _noop


# -- option inheritance ------------------------------------------------------------------------


def test_a_handler_without_options_gets_the_library_defaults() -> None:
    router = WorkflowRouter()
    router.on("charge")(_noop)
    spec = router.handlers()["charge"]
    assert (spec.max_attempts, spec.retry, spec.on_lost) == (
        DEFAULT_MAX_ATTEMPTS,
        DEFAULT_RETRY,
        "retry",
    )
    assert DEFAULT_MAX_ATTEMPTS == 5


def test_a_handler_inherits_unset_options_from_its_router() -> None:
    policy = RetryPolicy(base_seconds=2, max_seconds=20, jitter=0)
    router = WorkflowRouter(max_attempts=3, retry=policy, on_lost="dead")
    router.on("charge")(_noop)
    spec = router.handlers()["charge"]
    assert (spec.max_attempts, spec.retry, spec.on_lost) == (3, policy, "dead")


def test_handler_options_override_router_options() -> None:
    router_policy = RetryPolicy(base_seconds=2, max_seconds=20)
    handler_policy = RetryPolicy(base_seconds=5, max_seconds=50)
    router = WorkflowRouter(max_attempts=3, retry=router_policy, on_lost="dead")
    router.on("charge", max_attempts=9, retry=handler_policy, on_lost="retry")(_noop)
    spec = router.handlers()["charge"]
    assert (spec.max_attempts, spec.retry, spec.on_lost) == (9, handler_policy, "retry")


def test_options_resolve_from_the_nearest_level_that_sets_each_one() -> None:
    outer_policy = RetryPolicy(base_seconds=7, max_seconds=70)
    app = WorkflowRouter(max_attempts=11, retry=outer_policy, on_lost="dead")
    middle = WorkflowRouter(prefix="middle", max_attempts=4)
    leaf = WorkflowRouter(prefix="leaf", on_lost="retry")
    leaf.on("only_router_options")(_noop)
    leaf.on("own_attempts", max_attempts=2)(_other)
    middle.include_router(leaf)
    app.include_router(middle)
    specs = app.handlers()

    inherited = specs["middle.leaf.only_router_options"]
    # max_attempts from the middle router, retry from the outermost, on_lost from the leaf.
    assert (inherited.max_attempts, inherited.retry, inherited.on_lost) == (
        4,
        outer_policy,
        "retry",
    )
    own = specs["middle.leaf.own_attempts"]
    assert (own.max_attempts, own.retry, own.on_lost) == (2, outer_policy, "retry")


def test_an_included_routers_options_override_the_including_routers() -> None:
    app = WorkflowRouter(max_attempts=10, on_lost="dead")
    child = WorkflowRouter(prefix="child", max_attempts=2, on_lost="retry")
    child.on("x")(_noop)
    app.include_router(child)
    app.on("y")(_other)
    specs = app.handlers()
    assert (specs["child.x"].max_attempts, specs["child.x"].on_lost) == (2, "retry")
    assert (specs["y"].max_attempts, specs["y"].on_lost) == (10, "dead")


def test_options_of_the_including_router_do_not_leak_into_the_included_routers_own_view() -> None:
    app = WorkflowRouter(max_attempts=10)
    child = WorkflowRouter(prefix="child")
    child.on("x")(_noop)
    app.include_router(child)
    assert app.handlers()["child.x"].max_attempts == 10
    assert child.handlers()["child.x"].max_attempts == DEFAULT_MAX_ATTEMPTS


# -- duplicates, self-inclusion, cycles --------------------------------------------------------


def test_registering_a_type_twice_in_one_router_is_an_error() -> None:
    router = WorkflowRouter()
    router.on("charge")(_noop)
    with pytest.raises(RouterError, match=r"'charge' already has a handler \(_noop\)"):
        router.on("charge")(_other)
    assert router.handlers()["charge"].fn is _noop


def test_the_same_full_type_from_two_included_routers_is_an_error() -> None:
    first = WorkflowRouter(prefix="billing")
    first.on("charge")(_noop)
    second = WorkflowRouter()
    second.on("billing.charge")(_other)
    app = WorkflowRouter()
    app.include_router(first)
    with pytest.raises(RouterError, match=r"'billing\.charge' has two handlers: _noop and _other"):
        app.include_router(second)
    # The failed inclusion left the router as it was.
    assert _types(app) == ["billing.charge"]
    assert app.handlers()["billing.charge"].fn is _noop


def test_including_the_same_router_twice_under_the_same_prefix_is_an_error() -> None:
    email = WorkflowRouter(prefix="email")
    email.on("send")(_noop)
    app = WorkflowRouter()
    app.include_router(email)
    with pytest.raises(RouterError, match=r"'email\.send' has two handlers"):
        app.include_router(email)


def test_a_handler_clashing_with_an_included_one_is_refused_at_registration() -> None:
    child = WorkflowRouter(prefix="billing")
    child.on("charge")(_noop)
    app = WorkflowRouter()
    app.include_router(child)
    with pytest.raises(RouterError, match=r"'billing\.charge' has two handlers"):
        app.on("billing.charge")(_other)
    assert app.handlers()["billing.charge"].fn is _noop


def test_a_clash_created_inside_an_already_included_router_fails_the_workflow_system() -> None:
    child = WorkflowRouter(prefix="billing")
    app = WorkflowRouter()
    app.on("billing.charge")(_noop)
    app.include_router(child)
    child.on("charge")(_other)  # fine for the child alone
    with pytest.raises(RouterError, match=r"'billing\.charge' has two handlers"):
        WorkflowSystem(router=app, settings=Settings())


def test_a_router_cannot_include_itself() -> None:
    router = WorkflowRouter(prefix="a")
    router.on("x")(_noop)
    with pytest.raises(RouterError, match="a router cannot include itself"):
        router.include_router(router)
    assert _types(router) == ["a.x"]


def test_a_cycle_of_two_routers_is_refused() -> None:
    a = WorkflowRouter(prefix="a")
    b = WorkflowRouter(prefix="b")
    a.include_router(b)
    with pytest.raises(RouterError, match=r"including router 'a' would create a cycle"):
        b.include_router(a)


def test_a_longer_cycle_is_refused() -> None:
    a, b, c = WorkflowRouter(prefix="a"), WorkflowRouter(prefix="b"), WorkflowRouter(prefix="c")
    a.include_router(b)
    b.include_router(c)
    c.on("x")(_noop)
    with pytest.raises(RouterError, match="would create a cycle"):
        c.include_router(a)
    assert _types(a) == ["a.b.c.x"]


def test_include_router_refuses_what_is_not_a_router() -> None:
    app = WorkflowRouter()
    with pytest.raises(RouterError, match="include_router expects a WorkflowRouter, got 'x'"):
        app.include_router("x")  # type: ignore[arg-type]


# -- malformed prefixes and types --------------------------------------------------------------

MALFORMED = [
    pytest.param(".x", id="leading-dot"),
    pytest.param("x.", id="trailing-dot"),
    pytest.param("a..b", id="double-dot"),
    pytest.param("a b", id="space"),
    pytest.param(".", id="dot"),
    pytest.param("a/b", id="slash"),
    pytest.param("ä", id="non-ascii"),
    pytest.param("a\n", id="newline"),
]
NOT_STRINGS = [
    pytest.param(None, id="none"),
    pytest.param(1, id="int"),
    pytest.param(b"x", id="bytes"),
]


@pytest.mark.parametrize("prefix", MALFORMED)
def test_a_malformed_router_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(RouterError, match=f"invalid prefix {re.escape(repr(prefix))}"):
        WorkflowRouter(prefix=prefix)


@pytest.mark.parametrize("prefix", MALFORMED)
def test_a_malformed_include_prefix_is_refused_and_nothing_is_included(prefix: str) -> None:
    child = WorkflowRouter()
    child.on("x")(_noop)
    app = WorkflowRouter()
    with pytest.raises(RouterError, match=f"invalid prefix {re.escape(repr(prefix))}"):
        app.include_router(child, prefix=prefix)
    assert _types(app) == []


@pytest.mark.parametrize("prefix", NOT_STRINGS)
def test_a_prefix_that_is_not_a_string_is_refused(prefix: Any) -> None:
    with pytest.raises(RouterError, match=f"invalid prefix {re.escape(repr(prefix))}"):
        WorkflowRouter(prefix=prefix)
    with pytest.raises(RouterError, match=f"invalid prefix {re.escape(repr(prefix))}"):
        WorkflowRouter().include_router(WorkflowRouter(), prefix=prefix)


def test_an_empty_prefix_means_no_prefix() -> None:
    # '' is the documented default ("no prefix"), not an error: it adds no segment and no dot.
    child = WorkflowRouter(prefix="")
    child.on("x")(_noop)
    app = WorkflowRouter(prefix="")
    app.include_router(child, prefix="")
    assert _types(app) == ["x"]


@pytest.mark.parametrize("operation_type", [*MALFORMED, pytest.param("", id="empty")])
def test_a_malformed_operation_type_is_refused(operation_type: str) -> None:
    router = WorkflowRouter()
    with pytest.raises(
        RouterError, match=f"invalid operation type {re.escape(repr(operation_type))}"
    ):
        router.on(operation_type)
    assert _types(router) == []


@pytest.mark.parametrize("operation_type", NOT_STRINGS)
def test_an_operation_type_that_is_not_a_string_is_refused(operation_type: Any) -> None:
    with pytest.raises(
        RouterError, match=f"invalid operation type {re.escape(repr(operation_type))}"
    ):
        WorkflowRouter().on(operation_type)


# -- handlers and options ----------------------------------------------------------------------


def test_a_plain_function_handler_is_registered_to_run_in_a_thread() -> None:
    router = WorkflowRouter()

    def charge(ctx: Any, payload: Any) -> None:
        return None

    assert router.on("charge")(charge) is charge
    assert _types(router) == ["charge"]


@pytest.mark.parametrize("handler", [None, "charge", 42], ids=repr)
def test_a_handler_that_is_not_a_function_is_refused(handler: Any) -> None:
    with pytest.raises(RouterError, match=r"'charge' must be a function `async def"):
        WorkflowRouter().on("charge")(handler)


@pytest.mark.parametrize("max_attempts", [0, -1, 1.5, "3", True, False])
def test_an_invalid_max_attempts_is_refused_at_every_level(max_attempts: Any) -> None:
    message = rf"invalid max_attempts {max_attempts!r}, an integer >= 1"
    with pytest.raises(RouterError, match=rf"handler 'x': {message}"):
        WorkflowRouter().on("x", max_attempts=max_attempts)
    with pytest.raises(RouterError, match=rf"WorkflowRouter: {message}"):
        WorkflowRouter(max_attempts=max_attempts)


@pytest.mark.parametrize("on_lost", ["Dead", "retry ", "", "ignore", 1])
def test_an_invalid_on_lost_is_refused_at_every_level(on_lost: Any) -> None:
    message = rf"invalid on_lost {on_lost!r}, use 'retry' or 'dead'"
    with pytest.raises(RouterError, match=rf"handler 'x': {message}"):
        WorkflowRouter().on("x", on_lost=on_lost)
    with pytest.raises(RouterError, match=rf"WorkflowRouter: {message}"):
        WorkflowRouter(on_lost=on_lost)


@pytest.mark.parametrize("retry", [1, 2.5, {"base_seconds": 1}, "exponential"])
def test_a_retry_that_is_not_a_retry_policy_is_refused(retry: Any) -> None:
    message = rf"retry must be a RetryPolicy, got {retry!r}"
    with pytest.raises(RouterError, match=rf"handler 'x': {message}"):
        WorkflowRouter().on("x", retry=retry)
    with pytest.raises(RouterError, match=rf"WorkflowRouter: {message}"):
        WorkflowRouter(retry=retry)


def test_the_default_retry_policy_is_one_second_doubling_to_five_minutes_with_jitter() -> None:
    assert RetryPolicy() == RetryPolicy(base_seconds=1.0, max_seconds=300.0, jitter=0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_seconds": -1}, r"base_seconds=-1, max_seconds=300.0\): need 0 <= base_seconds"),
        ({"base_seconds": 10, "max_seconds": 5}, r"base_seconds=10, max_seconds=5\)"),
        ({"base_seconds": math.nan}, r"base_seconds=nan"),
        ({"base_seconds": math.inf, "max_seconds": math.inf}, r"base_seconds=inf"),
        ({"max_seconds": math.inf}, r"max_seconds=inf"),
        ({"max_seconds": 1e300}, r"max_seconds=1e\+300"),
        ({"jitter": -0.1}, r"jitter=-0.1: a fraction in \[0, 1\]"),
        ({"jitter": 1.5}, r"jitter=1.5: a fraction in \[0, 1\]"),
        ({"jitter": math.nan}, r"jitter=nan"),
        ({"base_seconds": "1"}, r"base_seconds='1': a number"),
        ({"jitter": True}, r"jitter=True: a number"),
    ],
)
def test_an_invalid_retry_policy_is_refused_when_it_is_made(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(RouterError, match=rf"invalid RetryPolicy.*{message}"):
        RetryPolicy(**kwargs)


def test_boundary_retry_policies_are_accepted() -> None:
    RetryPolicy(base_seconds=0, max_seconds=0, jitter=0)
    RetryPolicy(base_seconds=3, max_seconds=3, jitter=1)


def test_a_workflow_system_with_an_empty_router_is_refused() -> None:
    with pytest.raises(RouterError, match=r"the router has no handlers: register some with"):
        WorkflowSystem(router=WorkflowRouter(), settings=Settings())


def test_a_workflow_system_with_only_empty_included_routers_is_refused() -> None:
    app = WorkflowRouter()
    app.include_router(WorkflowRouter(prefix="empty"))
    with pytest.raises(RouterError, match="the router has no handlers"):
        WorkflowSystem(router=app, settings=Settings())
