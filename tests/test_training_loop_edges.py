"""Schedules, rates, monitoring and numerics checks around the training loop, as a user porting
a PyTorch loop relies on them: each case here was wrong or unclear before."""
import os
import re
import signal
import struct
import threading

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc import optim
from graphc.cli import main
from graphc.ir import TensorType
from graphc.ir.errors import GraphcError
from graphc.metrics import MetricError, confusion_matrix
from graphc.train import fit, load_checkpoint, save_checkpoint

torch = pytest.importorskip("torch")

X, Y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)


def make_step(lr=0.1, **kw):
    model = nn.Linear(3, 2)
    opt = optim.SGD(model.parameters(), lr=lr, **kw)
    return opt, gc.compile_train_step(model, F.mse_loss, opt, example_inputs=(X, Y))


def test_a_schedule_resumed_from_a_checkpoint_goes_on_as_the_uninterrupted_one(tmp_path):
    """The checkpoint kept 'lr' but not 'initial_lr': a scheduler built after loading (PyTorch's
    resume idiom, last_epoch=k) took the mid-schedule rate as its base."""
    opt, step = make_step()
    scheduler = optim.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        step(X, Y)
        scheduler.step()
    save_checkpoint(str(tmp_path / "run.ck"), step)
    resumed_opt, resumed = make_step()
    load_checkpoint(str(tmp_path / "run.ck"), resumed)
    resumed_scheduler = optim.StepLR(resumed_opt, step_size=2, gamma=0.5, last_epoch=2)
    for _ in range(3):
        assert resumed_opt.lr == opt.lr
        scheduler.step()
        resumed_scheduler.step()
    fresh_opt, _ = make_step()
    with pytest.raises(GraphcError, match=r"OneCycleLR\(last_epoch=2\): parameter group 0 has no "
                                          "'initial_lr' or 'max_lr' or 'min_lr'"):
        optim.OneCycleLR(fresh_opt, max_lr=1.0, total_steps=10, cycle_momentum=False, last_epoch=2)


def test_a_scheduler_refuses_groups_added_after_it_clearly():
    """It raised a bare IndexError."""
    head, backbone = np.ones(2, np.float32), np.ones(3, np.float32)
    opt = optim.SGD([head], lr=0.1)
    scheduler = optim.StepLR(opt, 1, 0.5)
    opt.add_param_group({"params": [backbone], "lr": 0.01})
    with pytest.raises(GraphcError, match="2 parameter groups, 1 when the scheduler was built"):
        scheduler.step()


@pytest.mark.parametrize("options", [
    {}, {"mode": "max", "factor": 0.5, "patience": 2, "threshold": 0.1},
    {"threshold_mode": "abs", "threshold": 0.05, "cooldown": 2, "patience": 1, "min_lr": 0.02},
    {"mode": "max", "threshold_mode": "abs", "patience": 0, "factor": 0.3, "eps": 1e-3}])
def test_reduce_lr_on_plateau_matches_pytorch(options):
    ours = optim.ReduceLROnPlateau(optim.SGD([np.ones(2, np.float32)], lr=0.1), **options)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), **options)
    metrics = [*np.random.default_rng(0).standard_normal(40), float("nan"), -1.0, -1.0, -0.99, 5.0]
    for metric in metrics:
        ours.step(metric)
        theirs.step(metric)
        assert ours.get_last_lr() == theirs.get_last_lr()


def test_fit_steps_reduce_lr_on_plateau_with_the_epochs_loss():
    opt, step = make_step(lr=0.0)  # the loss never moves: a plateau from the start
    scheduler = optim.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    history = fit(step, [(X, Y)], epochs=2, progress=False, scheduler=scheduler)
    assert scheduler.best == history.epochs[0]["loss"] and scheduler.num_bad_epochs == 1
    with pytest.raises(GraphcError, match="ReduceLROnPlateau monitors 'val_accuracy'"):
        fit(step, [(X, Y)], epochs=1, progress=False,
            scheduler=optim.ReduceLROnPlateau(opt, monitor="val_accuracy"))


@pytest.mark.parametrize("bad", [None, float("nan"), -0.1, float("inf"), "0.1"])
def test_a_learning_rate_that_is_no_rate_is_refused_before_the_weights_turn_nan(bad):
    opt, step = make_step()
    step(X, Y)
    opt.param_groups[0]["lr"] = bad
    weights = step.model.weight.copy()
    with pytest.raises(GraphcError, match=r"param_groups\[0\]\['lr'\] is .*a learning rate is a finite number >= 0"):
        step(X, Y)
    np.testing.assert_array_equal(step.model.weight, weights)


@pytest.mark.parametrize("name, options", [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}), ("Adam", {"lr": 0.1, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.1}), ("Adagrad", {"lr": 0.1, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.5})])
def test_maximize_ascends_as_pytorchs(name, options):
    model, reference = nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    ours = getattr(optim, name)(model.parameters(), maximize=True, **options)
    theirs = getattr(torch.optim, name)(reference.parameters(), maximize=True, **options)
    x, y = np.random.default_rng(0).standard_normal((4, 3)), np.zeros((4, 2))
    step = gc.compile_train_step(model, F.mse_loss, ours, example_inputs=(x, y))
    for _ in range(4):
        step(x, y)
        theirs.zero_grad()
        torch.nn.functional.mse_loss(reference(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        theirs.step()
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, reference.state_dict()[key].numpy(), rtol=1e-12, atol=1e-14)


def test_pytorchs_eager_optimizer_calls_point_to_the_compiled_step():
    opt, _ = make_step()
    for call in (opt.zero_grad, opt.step, opt.state_dict, lambda: opt.load_state_dict({})):
        with pytest.raises(GraphcError, match="inside a compiled training step"):
            call()


def test_profiling_and_checking_numerics_leave_the_random_generator_alone():
    """Each drew a key, so a run that profiled once drew other dropout masks afterwards."""
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])

    def run(inspect):
        gc.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2))
        step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                     example_inputs=(x, y))
        step(x, y)
        if inspect:
            step.profile(x, y, repeat=2)
            step.check_numerics(x, y)
        return step(x, y), gc.random.get_state()

    assert run(False)[0] == run(True)[0]
    np.testing.assert_array_equal(run(False)[1], run(True)[1])


def test_graphc_check_numerics_reaches_a_hand_written_loop(monkeypatch):
    """Only fit read the variable: a loop calling the step got NaN weights and no report."""
    monkeypatch.setenv("GRAPHC_CHECK_NUMERICS", "1")
    model = nn.Linear(3, 2)
    step = gc.compile_train_step(model, lambda out, y: F.mse_loss(gc.log(out - 100.0), y),
                                 optim.SGD(model.parameters(), lr=0.1), example_inputs=(X, Y))
    weights = model.weight.copy()
    with pytest.raises(GraphcError, match=r"training loss became nan in train_step's step 1: first "
                                          r"non-finite value: log at .*test_training_loop_edges.py"):
        step(X, Y)
    np.testing.assert_array_equal(model.weight, weights)  # put back as it was


def test_check_numerics_puts_a_loaded_step_back_as_it_was(monkeypatch, tmp_path):
    """A step loaded with gc.load raised on a NaN loss but kept the NaN weights and moments:
    every later step, good batches too, raised again."""
    model = nn.Linear(3, 2)
    step = gc.compile_train_step(model, F.mse_loss, optim.Adam(model.parameters(), lr=0.1),
                                 example_inputs=(X, Y))
    step.export(str(tmp_path / "s.gcx"))
    loaded = gc.load(str(tmp_path / "s.gcx"))
    before = {k: v.copy() for k, v in gc.train.training_state(loaded).items()}
    bad = X.copy()
    bad[0, 0] = np.nan
    for check in ("env", "fit"):
        with pytest.raises(GraphcError, match="its state was put back as it was before the call; a "
                                              "step loaded from a file cannot rerun the batch"):
            if check == "env":
                monkeypatch.setenv("GRAPHC_CHECK_NUMERICS", "1")
                loaded(bad, Y)
            else:
                monkeypatch.delenv("GRAPHC_CHECK_NUMERICS")
                fit(loaded, [(bad, Y)], progress=False, check_numerics=True)
        for name, array in gc.train.training_state(loaded).items():
            np.testing.assert_array_equal(array, before[name], err_msg=name)
    assert np.isfinite(loaded(X, Y))


@pytest.mark.parametrize("built", ["before", "after"])
@pytest.mark.parametrize("schedule", [lambda o: optim.ExponentialLR(o, gamma=0.5),
                                      lambda o: optim.CosineAnnealingLR(o, T_max=6),
                                      lambda o: optim.CosineAnnealingWarmRestarts(o, T_0=2)])
def test_fit_resumed_from_a_checkpoint_with_a_fresh_scheduler_goes_on_as_the_uninterrupted_run(
        tmp_path, schedule, built):
    """fit(initial_epoch=3) stepped a fresh scheduler from the rate the checkpoint restored,
    which was epoch 2's already: a chainable schedule applied its first factors twice
    (ExponentialLR 0.0625 where the run had 0.25)."""
    def rates(resume):
        opt, step = make_step(lr=1.0)
        scheduler = schedule(opt) if built == "before" or not resume else None
        if resume:
            load_checkpoint(str(tmp_path / "run.ck"), step)
            scheduler = scheduler or schedule(opt)
        seen = []
        fit(step, [(X, Y)], epochs=5, progress=False, scheduler=scheduler,
            initial_epoch=3 if resume else 1, on_epoch_start=lambda e: seen.append(opt.lr),
            checkpoint_path=None if resume else str(tmp_path / "all.ck"),
            on_epoch_end=lambda e, logs: e == 2 and save_checkpoint(str(tmp_path / "run.ck"), step))
        return seen

    uninterrupted = rates(resume=False)
    np.testing.assert_allclose(rates(resume=True), uninterrupted[2:], rtol=1e-12)


def test_fit_resumed_with_the_loader_of_a_failed_epoch_draws_that_epochs_shuffle():
    """A DataLoader that had begun epoch 2 when the run failed counted it already; fit(initial_epoch
    =2) then trained epoch 2 on epoch 3's shuffle."""
    data = np.arange(8, dtype=np.float32).reshape(8, 1)
    loader = gc.data.DataLoader(gc.data.TensorDataset(data, data), batch_size=2, shuffle=True, seed=0)
    list(loader)  # epoch 1 ran; epoch 2 failed after its first batch
    next(iter(loader))
    drawn = []  # the epochs drawn before each of fit's epochs
    model = nn.Linear(1, 1)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.0),
                                 example_inputs=(data[:2], data[:2]))
    fit(step, loader, epochs=3, progress=False, initial_epoch=2,
        on_epoch_start=lambda e: drawn.append(loader.epoch))
    assert drawn == [1, 2]


def test_a_monitor_no_epoch_logs_is_refused_before_training():
    """ReduceLROnPlateau(monitor="val_acc") failed after the whole first epoch, before its
    checkpoint was written."""
    opt, step = make_step()
    for kw in (dict(scheduler=optim.ReduceLROnPlateau(opt, monitor="val_acc")),
               dict(early_stopping=gc.train.EarlyStopping("val_acc"))):
        with pytest.raises(GraphcError, match="monitors 'val_acc', which no epoch logs; the logs "
                                              "are loss, samples_per_s, val_accuracy"):
            fit(step, [(X, Y)], val_loader=[(X, Y)], progress=False, **kw)
    assert step.step_count == 0


def test_ctrl_c_during_a_step_lands_after_its_whole_update(monkeypatch):
    """A KeyboardInterrupt between two of a step's kernels left some layers and moments updated
    and others not."""
    import contextlib
    import sys

    compile_module = sys.modules["graphc.compile"]  # (gc.compile is the function)
    deferred = compile_module.interrupts_deferred

    @contextlib.contextmanager
    def signalled_while_the_kernels_run():
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            yield

    opt, step = make_step()
    step(X, Y)  # compiled: only the kernels run in the block
    weight = step.model.weight.copy()
    monkeypatch.setattr(compile_module, "interrupts_deferred", signalled_while_the_kernels_run)
    with pytest.raises(KeyboardInterrupt):
        step(X, Y)
    assert step.step_count == 2 and not np.array_equal(step.model.weight, weight)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_checkpoint_waits_for_a_step_running_in_another_thread(tmp_path):
    """save_checkpoint from another thread mixed two steps' weights (each checksum right)."""
    opt, step = make_step()
    started, release = threading.Event(), threading.Event()

    def running_step():
        with gc.train.taking_turns(step):
            started.set()
            release.wait(10)

    runner = threading.Thread(target=running_step)
    runner.start()
    started.wait(10)
    saver = threading.Thread(target=save_checkpoint, args=(str(tmp_path / "c.ck"), step))
    saver.start()
    saver.join(0.3)
    assert saver.is_alive()  # waits for the step
    release.set()
    saver.join(10)
    runner.join(10)
    assert not saver.is_alive() and os.path.exists(tmp_path / "c.ck")


def logged_scalars(path):
    """(tag, step) of every scalar in a TensorBoard event file (TFRecords: a length, its CRC,
    the Event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event
    data, at, found = path.read_bytes(), 0, []
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        event = Event.FromString(data[at + 12:at + 12 + length])
        found += [(value.tag, event.step) for value in event.summary.value]
        at += 12 + length + 4
    return found


def test_tensorboard_logs_survive_resumes_quick_reruns_and_failures(tmp_path):
    """A resumed fit logged its batches at steps 1, 2, ... again; two runs within one second
    wrote one file; a failing run left its file empty."""
    opt, step = make_step()
    batches = [(X, Y)] * 3
    fit(step, batches, epochs=2, progress=False, log_dir=str(tmp_path))
    fit(step, batches, epochs=3, initial_epoch=3, progress=False, log_dir=str(tmp_path))
    steps = [step for name in os.listdir(tmp_path)
             for tag, step in logged_scalars(tmp_path / name) if tag == "train/loss"]
    assert sorted(steps) == list(range(1, 10))
    failing = tmp_path / "failing"
    opt.lr = float("inf")
    with pytest.raises(GraphcError):
        fit(step, batches, epochs=1, progress=False, log_dir=str(failing))
    assert sum(os.path.getsize(failing / f) for f in os.listdir(failing)) > 0


def test_a_loaded_graphs_name_cannot_lead_dumps_out_of_their_folder(tmp_path, monkeypatch):
    from graphc.passes import Stages
    monkeypatch.setenv("GRAPHC_DUMP", str(tmp_path / "dump"))
    stages = Stages("../../planted")
    stages.record("trace", gc.trace(lambda x: x * 2, np.ones(2, np.float32)))
    assert os.listdir(tmp_path) == ["dump"]
    assert sorted(os.listdir(tmp_path / "dump")) == ["_.._planted.00.trace.dot", "_.._planted.00.trace.txt"]


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_cli_train_stops_at_a_nan_loss_and_saves_nothing(tmp_path, capsys):
    """It printed 'last loss nan', exited 0 and wrote the NaN weights over the file given."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=3e38),
                                 (np.zeros((8, 1, 28, 28), np.float32), np.arange(8)))
    path = tmp_path / "step.gcx"
    step.export(str(path))
    before = path.read_bytes()
    data = tmp_path / "mnist"
    data.mkdir()
    write_idx(data / "t10k-images-idx3-ubyte", np.random.default_rng(0).integers(0, 255, (64, 28, 28)))
    write_idx(data / "t10k-labels-idx1-ubyte", np.arange(64) % 10)
    assert main(["train", str(path), "--data", str(data), "--steps", "6", "--save", str(path),
                 "--quiet"]) == 1
    assert "the training loss became nan" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("option, message", [
    ("--max-delay-ms", r"max_delay_ms >= 0.* are needed \(got 8, nan"),
    ("--drain-timeout-s", "drain_timeout_s must be a finite number >= 0, got nan")])
def test_serve_refuses_a_nan_duration(tmp_path, capsys, option, message):
    """--max-delay-ms nan was taken, and the server then answered no request."""
    pytest.importorskip("aiohttp")
    path = str(tmp_path / "linear.gcx")
    gc.compile(nn.Linear(4, 2), np.zeros((2, 4), np.float32)).export(path, max_batch=8)
    assert main(["serve", path, "--port", "0", "--max-batch", "8", option, "nan"]) == 1
    assert re.search(message, capsys.readouterr().err)


def test_confusion_matrix_refuses_labels_too_large_for_memory():
    """Two labels, one of 30000, asked for a 6.7 GiB matrix (MemoryError inside NumPy)."""
    for large in (30_000, 3_000_000_000, 4_000_000_000):
        with pytest.raises(MetricError, match="at most 8192 classes"):
            confusion_matrix([0, large], [0, 1])


def test_validation_leaves_out_the_targets_a_loss_ignores():
    """Targets of -100 (cross_entropy's ignore_index) trained, then fit's validation raised
    'labels must be non-negative class indices' after the first epoch; a batch of ignored
    targets alone (NaN loss) made the epoch's val_loss NaN."""
    from graphc.data import DataLoader, TensorDataset
    from graphc.train import evaluate
    gc.manual_seed(0)
    model = nn.Linear(4, 3)
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    y = np.array([0, 1, 2, -100, 1, 0, -100, -100, -100, -100, 2, 1])
    compiled = gc.compile(model, x[:4])
    result = evaluate(compiled, F.cross_entropy, DataLoader(TensorDataset(x, y), 4))
    counted = y >= 0
    scores = compiled(x).astype(np.float64)
    log_p = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    assert result["loss"] == pytest.approx(-log_p[counted, y[counted]].mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(scores.argmax(1)[counted] == y[counted]))
    assert result["confusion"].sum() == counted.sum() and len(result["predictions"]) == 12
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), (x[:4], y[:4]))
    history = fit(step, DataLoader(TensorDataset(x, y), 4), epochs=1, progress=False,
                  val_loader=DataLoader(TensorDataset(x, y), 4))
    assert np.isfinite(history.epochs[0]["val_loss"])
    # every target ignored: no metric is defined (precision of nothing raised MetricError)
    ignored = np.full(12, -100)
    none_counted = evaluate(compiled, F.cross_entropy, DataLoader(TensorDataset(x, ignored), 4))
    assert np.isnan(none_counted["loss"]) and np.isnan(none_counted["accuracy"])


def test_a_type_of_more_elements_than_memory_holds_is_refused():
    """Its size overflowed int64: a crafted file's graph ran a kernel over 2**64 elements."""
    with pytest.raises(ValueError, match="more than any array can hold"):
        TensorType.parse("f32[4000000000,4000000000]")
    with pytest.raises(gc.ShapeError, match="random_uniform: shape .* more than any array can hold"):
        from graphc.ir import Builder
        b = Builder("g")
        b.bind("random_uniform", b.add_input(TensorType((2,), "int64"), "rng", "rng"), shape=(2**33, 2**31))
