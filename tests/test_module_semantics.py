"""Module registration and traversal as PyTorch's (issue 19: porting nanoGPT and torchvision's
ResNet): reassignment over plain attributes, None over registered names, del, state_dict and
parameter order, register_*, apply, named_modules names."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import GraphcError
from graphc.nn.module import ModuleAssignmentError


class Reassigned(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = None
        self.down = nn.Linear(2, 2)
        self.w = None
        self.w = nn.Parameter(np.ones(2, np.float32))
        self.flag = 3
        self.flag = np.zeros(2, np.float32)  # a plain array stays a plain attribute

    def forward(self, x):
        return self.down(x) * self.w


def test_module_and_parameter_assigned_over_a_plain_attribute_are_registered():
    m = Reassigned()
    assert isinstance(m.down, nn.Linear)
    assert "down" not in m.__dict__ and "w" not in m.__dict__
    assert [n for n, _ in m.named_parameters()] == ["w", "down.weight", "down.bias"]
    assert list(m.state_dict()) == ["w", "down.weight", "down.bias"]
    assert isinstance(m.flag, np.ndarray) and "flag" not in m.state_dict()
    x = np.ones((1, 2), np.float32)
    expected = (x @ m.down.weight.T + m.down.bias) * m.w
    np.testing.assert_allclose(gc.jit(m)(x), expected, rtol=1e-6)


def test_none_over_registered_names_keeps_them_registered_as_absent():
    m = nn.Module()
    m.bias = nn.Parameter(np.ones(1, np.float32))
    m.child = nn.Linear(1, 1)
    m.register_buffer("stat", np.zeros(1, np.float32))
    m.bias = None
    m.child = None
    m.stat = None
    assert m.bias is None and m.child is None and m.stat is None
    assert "bias" in m._parameters and "child" in m._modules and "stat" in m._buffers
    assert list(m.state_dict()) == [] and list(m.named_parameters()) == []
    assert list(m.children()) == [] and [n for n, _ in m.named_modules()] == [""]
    m.bias = nn.Parameter(np.zeros(2, np.float32))  # and can be given a value again
    assert [n for n, _ in m.named_parameters()] == ["bias"]


@pytest.mark.parametrize("name, value", [("weight", 3), ("child", 3), ("stat", "x")])
def test_a_plain_value_over_a_registered_name_is_refused(name, value):
    m = nn.Module()
    m.weight = nn.Parameter(np.ones(1, np.float32))
    m.child = nn.Linear(1, 1)
    m.register_buffer("stat", np.zeros(1, np.float32))
    with pytest.raises(ModuleAssignmentError, match=name):
        setattr(m, name, value)


def test_an_array_over_a_buffer_replaces_the_buffer():
    m = nn.BatchNorm1d(2)
    m.running_mean = np.full(2, 5.0, np.float32)
    assert "running_mean" in m._buffers
    np.testing.assert_array_equal(m.state_dict()["running_mean"], [5.0, 5.0])


def test_del_removes_registered_and_plain_attributes():
    m = Reassigned()
    del m.w, m.down, m.flag
    assert list(m.state_dict()) == []
    for name in ("w", "down", "flag"):
        assert not hasattr(m, name)
    m.w = 4  # a plain attribute again
    assert m.w == 4


def test_register_parameter_buffer_module_and_their_checks():
    m = nn.Module()
    m.register_parameter("w", nn.Parameter(np.ones(2, np.float32)))
    m.register_parameter("absent", None)
    m.register_buffer("kept", np.zeros(1, np.float32))
    m.register_buffer("scratch", np.zeros(1, np.float32), persistent=False)
    m.add_module("lin", nn.Linear(1, 1))
    m.register_module("other", nn.Linear(1, 1))
    assert m.absent is None
    assert list(m.state_dict()) == ["w", "kept", "lin.weight", "lin.bias", "other.weight",
                                    "other.bias"]
    assert [n for n, _ in m.named_buffers()] == ["kept", "scratch"]
    m.load_state_dict(m.state_dict())  # strict: the non-persistent buffer is not expected
    with pytest.raises(ModuleAssignmentError):
        m.register_parameter("plain", np.ones(1))  # PyTorch wants an nn.Parameter
    with pytest.raises(ModuleAssignmentError):
        m.register_buffer("a.b", np.ones(1))
    with pytest.raises(ModuleAssignmentError):
        m.register_buffer("w", np.ones(1))  # a parameter already
    with pytest.raises(ModuleAssignmentError):
        m.register_module("forward", nn.Linear(1, 1))  # a method of the class


def test_apply_visits_children_first_and_returns_the_module():
    net = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen == ["Linear", "ReLU", "Linear", "Sequential", "Sequential"]


def test_apply_initialises_weights_that_a_compiled_step_then_reads():
    net = nn.Linear(2, 1)
    f = gc.jit(net)
    x = np.ones((1, 2), np.float32)
    f(x)

    def init(m):
        if isinstance(m, nn.Linear):
            m.weight[...] = 2.0
            m.bias[...] = 0.5
    net.apply(init)
    np.testing.assert_allclose(f(x), [[4.5]])


def test_shared_module_and_tied_parameter_listed_once_state_dict_under_each_name():
    shared = nn.Linear(2, 2)
    net = nn.Module()
    net.a = shared
    net.b = shared
    assert [n for n, _ in net.named_modules()] == ["", "a"]
    assert [n for n, _ in net.named_modules(remove_duplicate=False)] == ["", "a", "b"]
    assert [n for n, _ in net.named_parameters()] == ["a.weight", "a.bias"]
    assert list(net.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]


# -- against PyTorch --------------------------------------------------------------------------

def _tree(nn_):
    """A model with BatchNorm, Linear and nested children, built from either library."""
    class Block(nn_.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn_.BatchNorm1d(3)
            self.inner = nn_.Sequential(nn_.Linear(3, 3), nn_.LayerNorm(3))

    class Net(nn_.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn_.Parameter(np.ones(3, np.float32) if nn_ is nn else
                                       __import__("torch").ones(3))
            self.stem = nn_.Linear(4, 3)
            self.blocks = nn_.ModuleList([Block(), Block()])
            self.head = nn_.Linear(3, 2)
            self.register_buffer("steps", np.zeros(1, np.float32) if nn_ is nn else
                                 __import__("torch").zeros(1))
    return Net()


def test_orders_and_names_match_pytorch():
    torch = pytest.importorskip("torch")
    ours, theirs = _tree(nn), _tree(torch.nn)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert [p.shape for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
    assert [n for n, _ in ours.named_modules(prefix="model")] == \
        [n for n, _ in theirs.named_modules(prefix="model")]
    seen_ours, seen_theirs = [], []
    ours.apply(lambda m: seen_ours.append(type(m).__name__))
    theirs.apply(lambda m: seen_theirs.append(type(m).__name__))
    assert seen_ours == seen_theirs


def test_state_dicts_zip_with_pytorchs():
    """Code that zips two state dicts (a port's weight copy) pairs the same tensors."""
    torch = pytest.importorskip("torch")
    ours, theirs = _tree(nn), _tree(torch.nn)
    for (name, a), (their_name, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert name == their_name and a.shape == tuple(t.shape)


def test_a_module_pickled_before_non_persistent_buffers_existed_loads():
    import pickle

    old = nn.BatchNorm1d(2)
    del old.__dict__["_non_persistent_buffers"]  # as pickled by earlier versions
    loaded = pickle.loads(pickle.dumps(old))
    assert list(loaded.state_dict()) == list(nn.BatchNorm1d(2).state_dict())
    loaded.register_buffer("scratch", np.zeros(1, np.float32), persistent=False)
    assert "scratch" not in loaded.state_dict()


def test_a_changed_setting_is_traced_again_as_pytorch_reads_it_each_call(caplog):
    """bn.momentum, bn.eps or dropout.p set after compiling were silently ignored (baked into
    the trace); like a replaced layer, a changed setting now compiles the model again."""
    import logging

    import graphc.nn.functional as F
    from graphc import optim
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.0),
                                 (np.zeros((4, 3), np.float32), np.zeros(4, np.int64)))
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    step(x, np.zeros(4, np.int64))
    before, batch_mean = model[1].running_mean.copy(), (x @ model[0].weight.T + model[0].bias).mean(0)
    model[1].momentum = 0.9
    with caplog.at_level(logging.WARNING, logger="graphc"):
        step(x, np.zeros(4, np.int64))
    assert "settings changed" in caplog.text
    np.testing.assert_allclose(model[1].running_mean, 0.1 * before + 0.9 * batch_mean, rtol=1e-5)

    dropout = nn.Dropout(0.5)
    run = gc.jit(dropout)
    ones = np.ones((4, 100), np.float32)
    assert (run(ones) == 0).any()
    dropout.p = 0.0
    with caplog.at_level(logging.WARNING, logger="graphc"):
        caplog.clear()
        np.testing.assert_array_equal(run(ones), ones)
    assert "Dropout).p: 0.5 -> 0.0" in caplog.text


class WritesItsState(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("last_mean", np.zeros(3, np.float32))
        self.target = target

    def forward(self, x):
        if self.target == "buffer":
            self.last_mean[:] = x.mean(0)  # PyTorch writes the buffer
        elif self.target == "weight":
            self.lin.weight[:, 0] = 0.0
        else:
            F.relu(self.lin.bias, inplace=True)
        h = x * 1.0
        h[0] = 0.0  # an in-place write into a value of the trace's own stays fine
        return self.lin(h)


@pytest.mark.parametrize("target", ["buffer", "weight", "inplace_activation"])
def test_an_in_place_write_into_module_state_in_traced_code_is_refused(target):
    """It changed the trace's Tensor and never the module: silently lost in a training step
    and under gc.jit."""
    model = WritesItsState(target)
    x, y = np.ones((4, 3), np.float32), np.zeros(4, np.int64)
    with pytest.raises(GraphcError, match=r"module's parameter or buffer.*update_buffer.*test_module_semantics"):
        gc.compile_train_step(model, F.cross_entropy, gc.optim.SGD(model.parameters(), lr=0.1), (x, y),
                              backend="reference")
    with pytest.raises(GraphcError, match="module's parameter or buffer"):
        gc.jit(model, backend="reference")(x)


def test_an_in_place_write_into_a_buffer_after_update_buffer_updates_it():
    """`self.buf += 1` after update_buffer: Python assigns the tensor back to the buffer's name,
    which was refused with advice to delete the buffer."""
    import graphc.nn.functional as F

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("buf", np.zeros(3, np.float32))

        def forward(self, x):
            self.update_buffer("buf", self.buf + x.mean(0))
            self.buf += 1.0
            return self.lin(x * self.buf)
    model = Counted()
    x, y = np.ones((4, 3), np.float32), np.zeros(4, np.int64)
    step = gc.compile_train_step(model, F.cross_entropy, gc.optim.SGD(model.parameters(), lr=0.1), (x, y),
                                 backend="reference")
    step(x, y)
    np.testing.assert_array_equal(model.buf, [2.0, 2.0, 2.0])
