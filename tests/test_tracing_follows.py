"""What a compiled function follows of the Python state it was traced from, beyond its
modules' parameters (test_module_changes.py): NumPy attributes used through NumPy expressions,
class-level settings, modules read but not called, settings of more kinds, parameters
registered after compiling; the precision of a Python float argument; the order of a returned
dict; and the error a number argument used as a size gives."""
import contextlib
import enum
from collections import OrderedDict

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import TracedValueError

X = np.array([[0.5, -1.0, 2.0]], np.float32)


def _linear():
    gc.manual_seed(0)
    return nn.Linear(3, 3)


def test_an_array_attribute_used_through_numpy_is_followed_written_or_replaced():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear()
            self.mask = np.ones(3, np.float32)
            self.scale = np.array([2.0], np.float32)

        def forward(self, x):
            return self.fc(x) * (1 - self.mask) * float(self.scale[0])

    model = Masked()
    f = gc.jit(model)
    np.testing.assert_array_equal(f(X), 0)
    model.mask[1] = 0  # in place
    eager = gc.jit(lambda x: model.fc(x))(X) * 2
    np.testing.assert_allclose(f(X)[0, 1], eager[0, 1], rtol=1e-6)
    model.mask = np.zeros(3, np.float32)  # replaced
    np.testing.assert_allclose(f(X), eager, rtol=1e-6)
    model.scale[0] = 4.0
    np.testing.assert_allclose(f(X), 2 * eager, rtol=1e-6)


def test_an_array_the_forward_writes_itself_is_its_own_state_not_a_retrace_each_call(capsys):
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = np.zeros(1)

        def forward(self, x):
            self.calls += 1  # written by the trace: its own state
            return x * 2

    f = gc.jit(Counting())
    f(X), f(X), f(X)
    assert "retracing" not in capsys.readouterr().err


def test_a_class_level_setting_is_followed():
    class Scaled(nn.Module):
        scale = 2.0

        def __init__(self):
            super().__init__()
            self.fc = _linear()

        def forward(self, x):
            return self.fc(x) * self.scale

    model = Scaled()
    f, compiled = gc.jit(model), gc.compile(model, (X,))
    before = f(X)
    Scaled.scale = 10.0
    np.testing.assert_allclose(f(X), before * 5, rtol=1e-6)
    np.testing.assert_allclose(compiled(X), before * 5, rtol=1e-6)


def test_settings_and_mode_of_a_module_read_but_not_called_are_followed():
    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = 1.0

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear()

    temperature, outer = Temperature(), Outer()
    f = gc.jit(lambda x: outer.fc(x) / temperature.t * (2 if outer.training else 1))
    before = f(X)
    temperature.t = 4.0
    np.testing.assert_allclose(f(X), before / 4, rtol=1e-6)
    outer.eval()
    np.testing.assert_allclose(f(X), before / 8, rtol=1e-6)


class Reduce(enum.Enum):
    SUM = "sum"
    MEAN = "mean"


def test_settings_of_more_kinds_are_followed_enum_dtype_slice_set():
    class Configured(nn.Module):
        def __init__(self):
            super().__init__()
            self.reduce, self.dtype, self.columns, self.skip = Reduce.SUM, np.dtype("float32"), slice(0, 2), set()

        def forward(self, x):
            y = x[:, self.columns].to(self.dtype)
            y = y * np.array([0.0 if i in self.skip else 1.0 for i in range(y.shape[1])], y.dtype)
            return y.sum() if self.reduce is Reduce.SUM else y.mean()

    model = Configured()
    f = gc.jit(model)
    assert f(X) == pytest.approx(-0.5)
    model.reduce = Reduce.MEAN
    assert f(X) == pytest.approx(-0.25)
    model.columns = slice(0, 3)
    assert f(X) == pytest.approx(1.5 / 3)
    model.skip.add(2)  # in place
    assert f(X) == pytest.approx(-0.5 / 3)
    model.dtype = np.dtype("float64")
    assert f(X).dtype == np.float64


@pytest.mark.parametrize("register", ["parameter", "buffer"])
def test_a_parameter_or_buffer_registered_after_compiling_is_followed(register):
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear()

        def forward(self, x):
            shift = getattr(self, "shift", None)
            return self.fc(x) if shift is None else self.fc(x) + shift

    model = Shifted()
    f, compiled = gc.jit(model), gc.compile(model, (X,))
    before = f(X)
    if register == "parameter":
        model.shift = nn.Parameter(np.full(3, 100.0, np.float32))
    else:
        model.register_buffer("shift", np.full(3, 100.0, np.float32))
    np.testing.assert_allclose(f(X), before + 100, rtol=1e-6)
    np.testing.assert_allclose(compiled(X), before + 100, rtol=1e-6)


def test_a_python_float_argument_keeps_double_precision_beside_float64_arrays():
    x64 = np.ones(3, np.float64)
    assert gc.jit(lambda a, s: a * s)(x64, 0.1)[0] == 0.1
    assert gc.grad(lambda a, s: ((a - s) ** 2).sum())(x64, 1 / 3)[0] == 2 * (1 - 1 / 3)
    # beside float32 arrays (or alone) a Python float is float32, as PyTorch's default dtype
    assert gc.jit(lambda a, s: a * s)(np.ones(3, np.float32), 0.1).dtype == np.float32
    assert gc.jit(lambda s: s * 2)(0.1).dtype == np.float32


def test_a_returned_dict_keeps_its_order_and_an_ordered_dict_its_class():
    out = gc.jit(lambda x: {"logits": x * 10, "aux": x * 0})(X)
    assert list(out) == ["logits", "aux"]
    first, _ = out.values()
    np.testing.assert_array_equal(first, X * 10)
    ordered = gc.jit(lambda x: OrderedDict([("z", x), ("a", x + 1)]))(X)
    assert type(ordered) is OrderedDict and list(ordered) == ["z", "a"]
    # dicts with the keys in another order are other structures: each keeps its own order
    f = gc.jit(lambda d: {k: v * 2 for k, v in d.items()})
    assert list(f({"b": X, "a": X})) == ["b", "a"]
    assert list(f({"a": X, "b": X})) == ["a", "b"]


@pytest.mark.parametrize("call", [lambda a, n: a.reshape(n, 3), lambda a, k: a.topk(k).values,
                                  lambda a, p: F.dropout(a, p), lambda a, d: a.reshape(2, 3).softmax(d)])
def test_a_number_argument_used_as_a_size_or_setting_says_to_close_over_it(call):
    with pytest.raises(TracedValueError, match=r"a number passed as an argument is traced as a "
                                               r"tensor.*close over the number"):
        gc.jit(call)(np.arange(6, dtype=np.float32), 2)


def test_an_object_argument_is_refused_naming_its_class_and_the_way_out():
    from dataclasses import dataclass

    @dataclass
    class Config:
        scale: float = 2.0

    with pytest.raises(gc.GraphcError, match="is a Config, which a traced function cannot take "
                                             "as an argument: pass its arrays"):
        gc.jit(lambda x, c: x * c.scale)(X, Config())


def test_forward_hooks_run_as_pytorchs_and_compiled_functions_follow_them():
    torch = pytest.importorskip("torch")
    model = _linear()
    torch_model = torch.nn.Linear(3, 3)
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    f, compiled = gc.jit(model), gc.compile(model, (X,))
    plain = f(X)
    seen = []
    with model.register_forward_hook(lambda m, args, out: out * 2):
        np.testing.assert_allclose(f(X), plain * 2, rtol=1e-6)
        np.testing.assert_allclose(compiled(X), plain * 2, rtol=1e-6)
        handle = model.register_forward_pre_hook(lambda m, args: (args[0] + 1,), prepend=True)
        kw = model.register_forward_hook(lambda m, args, kwargs, out: seen.append(type(out).__name__),
                                         with_kwargs=True)
        torch_model.register_forward_hook(lambda m, args, out: out * 2)
        torch_model.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
        expected = torch_model(torch.tensor(X)).detach().numpy()
        np.testing.assert_allclose(f(X), expected, rtol=1e-5)
        np.testing.assert_allclose(compiled(X), expected, rtol=1e-5)
        handle.remove(), kw.remove()
    np.testing.assert_allclose(f(X), plain, rtol=1e-6)  # every hook removed
    np.testing.assert_allclose(compiled(X), plain, rtol=1e-6)
    assert seen == ["Tensor", "Tensor"]  # traced once by each compiled function


def test_an_always_call_hook_runs_when_forward_raises():
    class Failing(nn.Module):
        def forward(self, x):
            raise ValueError("no")

    model, seen = Failing(), []
    model.register_forward_hook(lambda m, args, out: seen.append(out), always_call=True)
    model.register_forward_hook(lambda m, args, out: seen.append("not always"))
    with pytest.raises(ValueError, match="no"):
        model(X)
    assert seen == [None]


def test_large_attributes_are_followed_when_assigned_not_compared_at_every_call(monkeypatch, caplog):
    import graphc.tensor as tensor_module
    monkeypatch.setattr(tensor_module, "FOLLOWED_ARRAY_BYTES", 64)

    class Vocabulary(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear()
            self.words = [f"w{i}" for i in range(5000)]  # never read by forward
            self.table = np.ones(100, np.float32)  # 400 bytes: past the (patched) limit

        def forward(self, x):
            return self.fc(x) * self.table[0]

    model = Vocabulary()
    f = gc.jit(model)
    with caplog.at_level("WARNING", logger="graphc"):
        before = f(X)
    assert any("register it as a buffer" in r.getMessage() for r in caplog.records)
    assert tensor_module._snapshot(model.words)[0] == "large list"
    model.table[0] = 3  # a write into it is not followed (said when traced) ...
    np.testing.assert_allclose(f(X), before, rtol=1e-6)
    model.table = np.full(100, 3, np.float32)  # ... a new array is
    np.testing.assert_allclose(f(X), before * 3, rtol=1e-6)
    model.words.append("new")  # an edit of a large list changes nothing compiled
    np.testing.assert_allclose(f(X), before * 3, rtol=1e-6)


def test_a_setting_switched_back_and_forth_or_a_hook_added_again_compiles_once_each(capsys):
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear()
            self.double_it = False

        def forward(self, x):
            return self.fc(x) * (2 if self.double_it else 1)

    model = Switch()
    f = gc.jit(model)
    hook = lambda m, args, out: out + 1  # noqa: E731
    for i in range(6):
        model.double_it = bool(i % 2)
        with model.fc.register_forward_hook(hook) if i % 3 == 0 else contextlib.nullcontext():
            f(X)
    assert capsys.readouterr().err.count("retracing") <= 3  # one per (flag, hook) variant


def test_dict_keys_of_equal_value_but_another_type_are_other_structures():
    g = gc.jit(lambda d: {f"out_{k!r}": v * 2 for k, v in d.items()})
    assert list(g({1: X})) == ["out_1"]
    assert list(g({1.0: X})) == ["out_1.0"]
    assert list(g({True: X})) == ["out_True"]


def test_a_python_float_beside_a_float64_torch_tensor_is_float64():
    torch = pytest.importorskip("torch")
    assert gc.jit(lambda a, s: a * s)(torch.ones(3, dtype=torch.float64), 0.1)[0] == 0.1


def test_tied_weights_stay_tied_through_containers_copies_and_casts():
    import copy
    import pickle
    emb = nn.Embedding(5, 3)
    extra = nn.ParameterList([emb.weight])
    assert extra[0] is emb.weight and extra[:1][0] is emb.weight

    class Head(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

    for source in (copy.deepcopy(emb), pickle.loads(pickle.dumps(emb)), nn.Embedding(5, 3).double()):
        assert [n for n, _ in Head(source.weight).named_parameters()] == ["weight"]
