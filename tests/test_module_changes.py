"""Changes to a model after compiling, as PyTorch eager would see them: each one either reaches
the compiled function (it traces again) or is refused with a message; none is silently ignored.
Also the module state that export, load_state_dict, copies and train() handle as PyTorch does."""
import copy
import pickle

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc import optim
from graphc.ir.errors import GraphcError

torch = pytest.importorskip("torch")

X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def fresh_trace(model, *args):
    """What the model computes now: traced and compiled from scratch."""
    return gc.jit(lambda *a: model(*a))(*args)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])
        self.heads = nn.ModuleDict({"out": nn.Linear(4, 4)})
        self.gain = np.ones(4, np.float32)  # a plain array, not a buffer
        self.scales = [1.0]
        self.register_buffer("offset", None)
        self.temperature = 1.0

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        x = self.heads["out"](x) * self.gain * self.scales[0]
        return x + self.offset if self.offset is not None else x

    def encode(self, x):
        return F.dropout(x * self.gain, 0.5, training=self.training) / self.temperature


def test_jit_follows_containers_attributes_and_registered_none():
    """gc.jit kept running the model it first traced after a layer was appended to a
    ModuleList or replaced in a ModuleDict (neither is ever called), after a plain array
    attribute was assigned or written in place, a list setting edited in place, or a buffer
    registered as None given an array."""
    model = Stack()
    compiled = gc.jit(model)
    edits = [lambda: model.layers.append(nn.Linear(4, 4)),
             lambda: model.layers.__setitem__(0, nn.Linear(4, 4)),
             lambda: model.heads.__setitem__("out", nn.Linear(4, 4)),
             lambda: model.gain.__setitem__(slice(None), 2.0),
             lambda: setattr(model, "gain", np.full(4, 3.0, np.float32)),
             lambda: model.scales.__setitem__(0, 5.0),
             lambda: setattr(model, "offset", np.full(4, 100.0, np.float32))]
    for edit in edits:
        before = compiled(X)
        edit()
        after = compiled(X)
        np.testing.assert_allclose(after, fresh_trace(model, X), rtol=1e-6)
        assert not np.allclose(after, before)


def test_compiled_models_and_steps_follow_attribute_arrays_and_registered_none():
    model = Stack()
    inference = gc.compile(model, X)
    inference(X)
    model.gain *= 2  # in place
    model.offset = np.full(4, 10.0, np.float32)
    np.testing.assert_allclose(inference(X), fresh_trace(model.eval(), X), rtol=1e-6)
    model.train()
    y = np.zeros((2, 4), np.float32)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.0),
                                 example_inputs=(X, y))
    first = step(X, y)
    model.gain[:] = 0  # the output is the offset alone now
    assert step(X, y) == pytest.approx(float(np.mean(model.offset ** 2)))
    assert step(X, y) != first


def test_jit_of_a_method_follows_the_modules_mode_and_settings():
    """A method's trace (not forward's) recorded neither the module's mode nor its settings."""
    model = Stack()
    encode = gc.jit(model.encode)
    assert (encode(X) == 0).any()  # dropout in training mode
    model.eval()
    np.testing.assert_array_equal(encode(X), X)
    model.temperature = 2.0
    np.testing.assert_array_equal(encode(X), X / 2)


def test_a_bias_given_to_a_layer_built_without_one_is_used():
    """forward read the constructor's flag: the bias was saved and trained but never added."""
    for layer, reference, shape, channels in [
            (nn.Linear(4, 3, bias=False), torch.nn.Linear(4, 3, bias=False), (2, 4), 3),
            (nn.Conv2d(2, 3, 3, bias=False), torch.nn.Conv2d(2, 3, 3, bias=False), (1, 2, 5, 5), 3),
            (nn.Conv1d(2, 3, 3, bias=False), torch.nn.Conv1d(2, 3, 3, bias=False), (1, 2, 5), 3),
            (nn.LayerNorm(4, bias=False), torch.nn.LayerNorm(4, bias=False), (2, 4), 4),
            (nn.GroupNorm(1, 2, affine=False), torch.nn.GroupNorm(1, 2, affine=False), (2, 2, 3), 2)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
        bias = np.full(channels, 10.0, np.float32)
        layer.bias = nn.Parameter(bias)
        reference.bias = torch.nn.Parameter(torch.from_numpy(bias.copy()))
        np.testing.assert_allclose(gc.jit(layer)(x), reference(torch.from_numpy(x)).detach().numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_multihead_attention_without_bias_registers_it_absent():
    attention = nn.MultiheadAttention(4, 2, bias=False)
    assert attention.in_proj_bias is None
    assert [n for n, _ in attention.named_parameters()] == [
        n for n, _ in torch.nn.MultiheadAttention(4, 2, bias=False).named_parameters()]


class WithMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", np.full(3, 2.0, np.float32), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_exports_hold_buffers_left_out_of_the_state_dict(tmp_path):
    """A non-persistent buffer (a causal mask, a rotary cache) was left out of the file, whose
    graph reads it: gc.load failed on graphc's own export."""
    model = WithMask()
    assert list(model.state_dict()) == ["lin.weight", "lin.bias"]
    compiled = gc.compile(model, X)
    compiled.export(str(tmp_path / "inference.gcx"))
    np.testing.assert_array_equal(gc.load(str(tmp_path / "inference.gcx"))(X), compiled(X))
    y = np.array([0, 1])
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 example_inputs=(X, y))
    step.export(str(tmp_path / "step.gcx"))
    loaded = gc.load(str(tmp_path / "step.gcx"))
    assert loaded(X, y) == step(X, y)


def test_a_training_steps_compiled_in_settings_are_refused_afterwards():
    """Assigning clip_grad_norm or loss_fn to a compiled step changed nothing, silently."""
    model = nn.Linear(4, 3)
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 example_inputs=(X, np.array([0, 1])))
    for name, value in [("clip_grad_norm", 1e-6), ("loss_fn", F.mse_loss), ("l1", 0.1)]:
        with pytest.raises(GraphcError, match=f"{name} is compiled into the training step.*test_module_changes"):
            setattr(step, name, value)
    step.extra_note = "plain attributes stay the user's"


class AlwaysEval(nn.BatchNorm1d):
    def train(self, mode=True):
        return super().train(False)


def test_train_calls_each_childs_own_train():
    """model.train() set `training` on every module directly, past a child overriding train()
    (a frozen BatchNorm), as PyTorch does not."""
    model = nn.Sequential(nn.Linear(4, 4), AlwaysEval(4))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 4), type("E", (torch.nn.BatchNorm1d,), {
        "train": lambda self, mode=True: torch.nn.BatchNorm1d.train(self, False)})(4))
    model.train()
    reference.train()
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()] == [True, True, False]


def test_load_state_dict_takes_bfloat16_and_names_a_ragged_entry():
    layer = nn.Linear(3, 2)
    reference = torch.nn.Linear(3, 2).to(torch.bfloat16)
    layer.load_state_dict(reference.state_dict())
    np.testing.assert_array_equal(layer.weight, reference.weight.float().detach().numpy())
    with pytest.raises(GraphcError, match="'weight' is not an array of one shape"):
        layer.load_state_dict({"weight": [[1, 2, 3], [4, 5]], "bias": [0, 0]})


def test_compiled_objects_refuse_copies_with_advice():
    """They failed with `cannot pickle '_thread.lock' object`."""
    model = nn.Linear(4, 3)
    compiled, jitted = gc.compile(model, X), gc.jit(model)
    jitted(X)
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 example_inputs=(X, np.array([0, 1])))
    for thing in (compiled, jitted, step):
        for duplicate in (copy.deepcopy, copy.copy, pickle.dumps):
            with pytest.raises(GraphcError, match="cannot be copied or pickled"):
                duplicate(thing)
    copy.deepcopy(model)  # the model itself copies


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)
        self.use_b = True

    def forward(self, x):
        return self.a(x), self.b(x)


@pytest.mark.parametrize("make", [
    lambda lib, p: lib.Adam(p, lr=0.1),
    lambda lib, p: lib.SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
    lambda lib, p: lib.Adagrad(p, lr=0.1, lr_decay=0.5)], ids=["Adam", "SGD", "Adagrad"])
def test_a_parameter_counts_only_its_own_updates(make):
    """Two steps sharing an optimizer, each reading one head: a head's bias correction (first
    momentum step, rate decay) used the optimizer's count, which the other head's steps moved
    too; PyTorch counts each parameter's own steps."""
    gc.manual_seed(0)
    model = TwoHeads().double()
    reference = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 2)}).double()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    opt, torch_opt = make(optim, model.parameters()), make(torch.optim, reference.parameters())
    x, y = np.random.default_rng(0).standard_normal((4, 3)), np.zeros((4, 2))
    steps = {head: gc.compile_train_step(model, lambda out, y, i=i: F.mse_loss(out[i], y), opt,
                                         example_inputs=(x, y)) for i, head in enumerate("ab")}
    for head in "abbab":
        steps[head](x, y)
        torch_opt.zero_grad()
        torch.nn.functional.mse_loss(reference[head](torch.from_numpy(x)), torch.from_numpy(y)).backward()
        torch_opt.step()
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value, reference.state_dict()[name].numpy(), rtol=1e-12, atol=1e-14)


def test_amsgrad_set_late_goes_on_with_the_parameters_count():
    """Turning amsgrad on after 5 steps restarted Adam's bias correction at step 1."""
    model = nn.Linear(3, 2).double()
    opt = optim.Adam(model.parameters(), lr=0.01)
    x, y = np.ones((2, 3)), np.zeros((2, 2))
    step = gc.compile_train_step(model, F.mse_loss, opt, example_inputs=(x, y))
    for _ in range(5):
        step(x, y)
    opt.param_groups[0]["amsgrad"] = True
    step = gc.compile_train_step(model, F.mse_loss, opt, example_inputs=(x, y))
    step(x, y)
    assert opt.state_of(model.weight).get("step", opt.step_count) == 6


def test_views_and_indices_of_attribute_arrays_and_arrays_shared_by_two_modules_are_followed():
    """A view (`self.P.T`, a slice) or an index (`x[:, self.perm]`) of an attribute array was
    an unwatched constant; of one array held by two modules only the last found was watched."""
    class Views(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.P, self.perm, self.keep, self.tbl = np.eye(2, dtype=np.float32), np.array([0, 1]), \
                np.array([True, False]), shared

        def forward(self, x):
            return (x @ self.P.T)[:, self.perm][:, self.keep] * self.tbl[:1]

    shared = np.ones(2, np.float32)
    model = nn.Sequential(Views(shared), Views(shared))
    x = np.array([[1.0, 2.0]], np.float32)
    compiled = gc.jit(model[0])
    for edit in (lambda: model[0].P.__setitem__((0, 0), 5.0),
                 lambda: model[0].perm.__setitem__(slice(None), [1, 0]),
                 lambda: setattr(model[0], "keep", np.array([False, True])),
                 lambda: setattr(model[0], "tbl", np.full(2, 3.0, np.float32))):
        edit()
        np.testing.assert_array_equal(compiled(x), fresh_trace(model[0], x))


def test_settings_are_compared_with_their_types_and_inside_tuples():
    """2 -> 2.0 (and 1 -> True) compared equal; a list inside a tuple was not copied."""
    class Typed(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.pick, self.cfg = 2, 1, ([1.0, 2.0], 3)

        def forward(self, x):
            return x * self.scale * self.cfg[0][1], x[self.pick]

    model = Typed()
    compiled = gc.jit(model)
    x = np.array([3, 4])
    compiled(x)
    model.scale, model.pick = 2.0, True
    model.cfg[0][1] = 7.0
    for got, expected in zip(compiled(x), fresh_trace(model, x)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_gc_compile_follows_list_and_dict_settings_edited_in_place():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scales, self.cfg = [1.0], {"k": 2.0}

        def forward(self, x):
            return x * self.scales[0] * self.cfg["k"]

    model = Scaled()
    compiled = gc.compile(model, X)
    compiled(X)
    model.scales[0] = 3.0
    model.cfg["k"] = 5.0
    np.testing.assert_allclose(compiled(X), X * 15, rtol=1e-6)


def test_what_a_forward_writes_into_its_module_is_its_state_not_a_setting(caplog):
    """A call counter or a list a forward appends to changed at each trace: training steps and
    compiled models compiled again at every call, gc.jit at every change of batch size."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls, self.shapes, self.lin = 0, [], nn.Linear(4, 2)

        def forward(self, x):
            self.calls += 1
            self.shapes.append(tuple(x.shape))
            return self.lin(x)

    model = Counting()
    jitted = gc.jit(model)
    for n in [3, 4] * 3:
        jitted(np.ones((n, 4), np.float32))
    assert model.calls == 2
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 example_inputs=(X, np.zeros((2, 2), np.float32)))
    compiled = gc.compile(model, X)
    before = model.calls
    for _ in range(4):
        step(X, np.zeros((2, 2), np.float32))
        compiled(X)
    assert model.calls == before


def test_a_function_held_as_a_setting_is_followed():
    """`layer.activation = F.gelu` after compiling was ignored: jitted functions and training
    steps kept computing relu (a fresh trace gave gelu, as PyTorch, which reads it per call)."""
    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), F.relu

        def forward(self, x):
            return self.act(self.lin(x))

    model = Act()
    jitted = gc.jit(model)
    step = gc.compile_train_step(model, lambda out, t: ((out - t) ** 2).mean(),
                                 optim.SGD(model.parameters(), lr=0.0), (X, X))
    before = step(X, X)
    jitted(X)
    model.act = F.tanh
    np.testing.assert_allclose(jitted(X), np.tanh(X @ model.lin.weight.T + model.lin.bias), rtol=1e-6)
    assert step(X, X) != before
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=F.relu).eval()
    x = np.random.default_rng(0).standard_normal((5, 2, 8)).astype(np.float32)
    compiled = gc.jit(layer)
    compiled(x)
    layer.activation = F.gelu
    np.testing.assert_allclose(compiled(x), fresh_trace(layer, x), rtol=1e-6)


def test_a_transformer_encoders_final_norm_can_be_added_or_removed_later():
    """Whether it had a norm was fixed when built: one assigned later was saved but never
    applied, and `encoder.norm = None` failed calling None; PyTorch reads `self.norm`."""
    x = np.random.default_rng(0).standard_normal((5, 2, 8)).astype(np.float32)
    te = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 2,
                                     enable_nested_tensor=False).eval()
    ge = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 2).eval()
    assert ge.norm is None and te.norm is None
    ge.load_state_dict({k: v.detach().numpy() for k, v in te.state_dict().items()})
    compiled = gc.jit(ge)
    np.testing.assert_allclose(compiled(x), te(torch.tensor(x)).detach().numpy(), atol=1e-5)
    te.norm, ge.norm = torch.nn.LayerNorm(8), nn.LayerNorm(8)
    torch.nn.init.constant_(te.norm.weight, 2.0)
    ge.norm.weight[...] = 2.0
    np.testing.assert_allclose(compiled(x), te(torch.tensor(x)).detach().numpy(), atol=1e-5)
    te.norm = ge.norm = None
    np.testing.assert_allclose(compiled(x), te(torch.tensor(x)).detach().numpy(), atol=1e-5)


def test_a_callable_object_or_jitted_function_held_as_a_setting_is_followed():
    """Only plain functions were followed: a callable object or a gc.jit function swapped
    after compiling kept computing the old one."""
    class Scale:
        def __init__(self, k):
            self.k = k

        def __call__(self, x):
            return x * self.k

    class Holds(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, x):
            return self.act(x)

    x = np.ones((2, 2), np.float32)
    model = Holds(Scale(2.0))
    compiled = gc.jit(model)
    assert compiled(x)[0, 0] == 2.0
    model.act = Scale(3.0)
    assert compiled(x)[0, 0] == 3.0
    model = Holds(gc.jit(F.relu))
    compiled = gc.jit(model)
    assert compiled(x)[0, 0] == 1.0
    model.act = gc.jit(F.sigmoid)
    np.testing.assert_allclose(compiled(x)[0, 0], 1 / (1 + np.exp(-1)), rtol=1e-6)
