import copy

import pytest
import torch

from d2mc.arch import ModelArch
from d2mc.context import Context
from d2mc.errors import UserError
from d2mc.pipeline import Pass, PassError, PassManager, PassResult, load_recipe
from d2mc.restructure import dense_plan, restructure
from tests.conftest import tiny_model


class Measure(Pass):
    name = "measure-things"
    requires = ("model",)
    provides = ("things",)

    def run(self, ctx):
        ctx.results["things"] = 3
        return PassResult(summary={"things": 3})


class UseThings(Pass):
    name = "use-things"
    requires = ("things",)
    provides = ("used",)

    def __init__(self, fail: bool = False, user_fail: bool = False):
        self.fail, self.user_fail = fail, user_fail

    def run(self, ctx):
        if self.fail:
            raise ValueError("boom")
        if self.user_fail:
            raise UserError("the plan is impossible")
        ctx.results["used"] = ctx.results["things"] * 2
        return PassResult()


class Sneaky(Pass):
    name = "sneaky"

    def run(self, ctx):
        return PassResult(modified=True)


def test_runs_in_order_and_times_each_pass():
    ctx = run_passes([Measure(), UseThings()])
    assert ctx.results["used"] == 6
    assert [p["name"] for p in ctx.report["passes"]] == ["measure-things", "use-things"]
    assert ctx.report["passes"][0]["things"] == 3


def run_passes(passes):
    manager = PassManager(passes)
    ctx = manager.run(Context(model=object()))
    assert set(manager.timings) == {p.name for p in passes}
    return ctx


def test_order_is_checked_before_anything_runs():
    ran = []

    class Spy(Measure):
        name = "spy"
        provides = ()

        def run(self, ctx):
            ran.append(self.name)

    with pytest.raises(UserError, match=r"pass 'use-things' \(step 2\) requires 'things', which is not "
                                        r"available \(expected 'measure-things' before 'use-things'\)"):
        PassManager([Spy(), UseThings(), Measure()]).run(Context(model=object()))
    assert ran == []


def test_missing_provider_is_named():
    with pytest.raises(UserError, match="no pass in the pipeline provides it"):
        PassManager([UseThings()]).validate({"model"})


def test_a_bug_names_the_pass_and_those_before_it():
    with pytest.raises(PassError, match=r"pass 'use-things' failed \(passes run before it: measure-things\): boom"):
        PassManager([Measure(), UseThings(fail=True)]).run(Context(model=object()))


def test_a_user_error_stays_one_line_with_the_pass_name():
    with pytest.raises(UserError, match="^use-things: the plan is impossible$"):
        PassManager([Measure(), UseThings(user_fail=True)]).run(Context(model=object()))


def test_an_analysis_pass_may_not_change_the_model():
    with pytest.raises(PassError, match="analysis pass 'sneaky' reported changing the model"):
        PassManager([Sneaky()]).run(Context())


def test_recipe_errors(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('passes = ["no-such-pass"]\n')
    with pytest.raises(UserError, match="unknown pass 'no-such-pass'"):
        load_recipe(path)
    path.write_text('passes = []\n[options.x]\na = 1\n')
    with pytest.raises(UserError, match="options given for 'x', which is not in 'passes'"):
        load_recipe(path)
    path.write_text('steps = []\n')
    with pytest.raises(UserError, match="unknown key 'steps'"):
        load_recipe(path)
    path.write_text('passes = [')
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(path)
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "none.toml")


class Rebuild(Pass):
    """Restructures the model in hand into the same blocks (its modules move into the new model)."""

    name = "rebuild"
    requires = ("model",)
    transforms_model = True
    consumes_model = True

    def run(self, ctx):
        ctx.model = restructure(ctx.model, dense_plan(ctx.arch.num_blocks))
        return PassResult(modified=True)


class SameModel(Rebuild):
    name = "same-model"

    def run(self, ctx):
        return PassResult(modified=True)


class Swap(Rebuild):
    name = "swap"
    consumes_model = False

    def run(self, ctx):
        ctx.model = copy.deepcopy(ctx.model)
        return PassResult(modified=True)


def tiny_context():
    model = tiny_model("llama", num_hidden_layers=2)
    return Context(model=model, arch=ModelArch.from_config(model.config))


def test_a_consumed_model_fails_loudly_and_its_successor_works():
    ctx = tiny_context()
    old = ctx.model
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        expected = old(ids).logits
        PassManager([Rebuild()]).run(ctx)
        assert ctx.model is not old and torch.equal(ctx.model(ids).logits, expected)
        for stale in (old, old.model):  # the model and the containers it left behind
            with pytest.raises(RuntimeError, match="this model was consumed by pass 'rebuild', which moved its "
                                                   "modules into a new model: use that model"):
                stale(ids)


def test_passes_keep_their_promise_about_the_model():
    with pytest.raises(PassError, match="pass 'same-model' declares consumes_model but did not leave a new model"):
        PassManager([SameModel()]).run(tiny_context())
    with pytest.raises(PassError, match="pass 'swap' replaced the model but does not declare consumes_model"):
        PassManager([Swap()]).run(tiny_context())


def test_each_result_has_one_writer():
    class MeasureToo(Measure):
        name = "measure-too"

    with pytest.raises(UserError, match="passes 'measure-things' and 'measure-too' both provide 'things'"):
        PassManager([Measure(), MeasureToo()]).validate({"model"})

    class Meddle(UseThings):
        def run(self, ctx):
            ctx.results["things"] = 4
            ctx.results["used"] = 8
            return PassResult()

    with pytest.raises(PassError, match="pass 'use-things' wrote things, which it does not provide"):
        PassManager([Measure(), Meddle()]).run(Context(model=object()))
