"""Checkpointer in one process, and trainer state without pickle."""

import json
import random
import threading

import numpy as np
import pytest
import torch

import ckptio
from ckptio.trainer_state import capture_rng_state, flatten, restore_rng_state, unflatten


def _adam_state(policy):
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3, betas=(0.8, 0.99))
    policy(torch.randn(4, 6)).sum().backward()
    opt.step()
    return opt


def test_trainer_state_round_trip_through_safetensors(tmp_path, policy):
    opt = _adam_state(policy)
    tree = {"optimizer": opt.state_dict(), "step": 7, "ratio": 0.5, "name": "x", "none": None,
            "arr": np.arange(5, dtype=np.uint32), "rng": capture_rng_state(), "weird/key": [1, (2, 3)]}  # fmt: skip
    tensors, meta = flatten(tree)
    with open(tmp_path / "t.safetensors", "wb") as f:
        ckptio.formats.write_safetensors(f, tensors, meta)
    with open(tmp_path / "t.safetensors", "rb") as f:
        back = unflatten(*ckptio.formats.read_safetensors(f, "t", mmap_file=False))
    assert back["step"] == 7 and back["none"] is None and back["weird/key"] == [1, (2, 3)]
    assert back["arr"].dtype == np.uint32 and back["arr"].tolist() == [0, 1, 2, 3, 4]
    saved = opt.state_dict()
    assert set(back["optimizer"]["state"]) == set(saved["state"])  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    fresh = torch.optim.Adam(policy.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    for pid, st in fresh.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], saved["state"][pid]["exp_avg"])


def test_trainer_state_refuses_arbitrary_objects():
    with pytest.raises(ckptio.CheckpointFormatError, match="no pickle"):
        flatten({"fn": lambda: 0})


def test_rng_capture_restore():
    state = capture_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(unflatten(*flatten(state)))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_interval_force_and_resume_in_one_process(tmp_path, env_meta):
    from archs import MLPArch

    cfg = ckptio.CheckpointConfig(epoch_interval=2, keep_last=2)
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    assert ck.policy_architecture == MLPArch()
    with pytest.raises(AttributeError):
        ck.policy_architecture = MLPArch(hidden=3)
    policy = ck.load_or_create_policy(env_meta)
    assert ck.resumed_from is None and ck.start_epoch == 0
    opt = _adam_state(policy)
    saved = [ck.save(policy, e, {"e": e}, {"optimizer": opt.state_dict()}) for e in range(1, 6)]
    assert [s is not None for s in saved] == [False, True, False, True, False]
    assert ck.save(policy, 5, force=True) is not None
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "model_architecture.json").read_text())
    assert manifest["class_path"] == "archs.MLPArch" and manifest["config"] == {"hidden": 16, "tied": False}
    assert {"ckptio_version", "created_at"} <= set(manifest)

    again = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    resumed = again.load_or_create_policy(env_meta)
    assert again.resumed_from.epoch == 5 and again.start_epoch == 6
    assert again.trainer_state is None  # the forced save at epoch 5 carried no trainer state
    assert torch.equal(resumed.head.weight, policy.head.weight)

    other = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=8), cfg)
    with pytest.raises(ckptio.ArchitectureError, match="different model"):
        other.load_or_create_policy(env_meta)


def test_fresh_policies_are_identical_and_do_not_shift_rng(tmp_path, env_meta):
    from archs import MLPArch

    torch.manual_seed(5)
    a = ckptio.Checkpointer(str(tmp_path / "a"), MLPArch()).load_or_create_policy(env_meta)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    b = ckptio.Checkpointer(str(tmp_path / "b"), MLPArch()).load_or_create_policy(env_meta)
    assert torch.equal(torch.rand(1), after_a)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_load_into_checks_every_key_and_shape_and_names_the_differences(tmp_path, env_meta):
    from archs import MLPArch

    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16))
    assert not ck.load_into(MLPArch(hidden=16).make_policy(env_meta))  # nothing saved yet: False, model untouched
    model = ck.load_or_create_policy(env_meta)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, env_meta["obs_dim"])).sum().backward()
    opt.step()
    ck.save(model, 1, {"r": 1.0}, optimizer=opt)
    # the same architecture, any fresh values: loads exactly, optimizer too
    target = MLPArch(hidden=16).make_policy(env_meta)
    target_opt = torch.optim.Adam(target.parameters())
    assert ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16)).load_into(target, target_opt)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert torch.equal(target_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # another width: every differing shape is listed, nothing is loaded
    wide = MLPArch(hidden=32).make_policy(env_meta)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ckptio.StateDictMismatchError) as err:
        ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16)).load_into(wide)
    message = str(err.value)
    assert "body.weight: checkpoint [16, 16], model [32, 32]" in message and "run.e00000001.safetensors" in message
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())


def test_load_into_copies_into_the_models_memory_and_keeps_a_modules_own_loading(tmp_path, env_meta):
    from archs import MLPArch

    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16))
    model = ck.load_or_create_policy(env_meta)
    ck.save(model, 1, {"r": 1.0})
    ck.close()
    want = {k: v.clone() for k, v in model.state_dict().items()}

    def load(target: torch.nn.Module) -> None:
        assert ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16)).load_into(target)
        assert target.state_dict().keys() == want.keys()
        for k, v in target.state_dict().items():
            assert not v.is_meta and torch.equal(v, want[k]), k

    # a plain built model: loaded into the parameters it has (an optimizer built on them sees the values)
    plain = MLPArch(hidden=16).make_policy(env_meta)
    params = list(plain.parameters())
    load(plain)
    assert all(p is q for p, q in zip(params, plain.parameters(), strict=True))
    # a module with a load hook of its own: loaded through load_state_dict, so the hook runs
    hooked = MLPArch(hidden=16).make_policy(env_meta)
    seen: list[int] = []
    hooked.register_load_state_dict_post_hook(lambda module, keys: seen.append(len(keys.missing_keys)))
    load(hooked)
    assert seen == [0]
    # a model on meta has no memory to load into: refused, by name, not left empty with a warning
    with torch.device("meta"):
        on_meta = MLPArch(hidden=16).make_policy(env_meta)
    with pytest.raises(
        ckptio.InvalidArgumentError,
        match=r"e00000001\.safetensors: .*body\.bias, body\.weight, embed\.bias \.\.\. on the meta.*to_empty",
    ):
        ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16)).load_into(on_meta)
    on_meta.to_empty(device="cpu")
    load(on_meta)


def test_load_into_optimizer_errors_name_the_checkpoint_file(tmp_path, env_meta):
    from archs import MLPArch

    run = str(tmp_path / "run")
    ck = ckptio.Checkpointer(run, MLPArch(hidden=16))
    model = ck.load_or_create_policy(env_meta)
    ck.save(model, 1, optimizer=_adam_state(model))
    # the same weights, but head.weight is a buffer here: the optimizer state names a parameter the model lacks
    target = MLPArch(hidden=16).make_policy(env_meta)
    weight = target.head.weight
    del target.head.weight
    target.head.register_buffer("weight", weight.detach())
    with pytest.raises(ckptio.StateDictMismatchError) as err:
        ckptio.Checkpointer(run, MLPArch(hidden=16)).load_into(target, torch.optim.Adam(target.parameters()))
    assert "run.e00000001.safetensors: optimizer state for 'head.weight'" in str(err.value)
    ck.save(model, 2)  # saved without an optimizer: loading one says which file holds none
    with pytest.raises(ckptio.CheckpointError, match=r"run\.e00000002\.safetensors: holds no optimizer state"):
        ckptio.Checkpointer(run, MLPArch(hidden=16)).load_into(model, torch.optim.Adam(model.parameters()))


@pytest.mark.parametrize("kind", ["tied", "shared-storage", "view-of-buffer"])
def test_a_background_save_writes_the_same_file_as_a_synchronous_one(tmp_path, env_meta, kind):
    """Same tensors, same aliases, same bytes: only the save id and the digests that cover it differ (#23)."""
    from archs import MLPArch

    from ckptio.formats import read_header

    torch.manual_seed(0)
    model = MLPArch(hidden=16, tied=kind == "tied").make_policy(env_meta)
    if kind == "shared-storage":  # two parameters in one allocation, at different offsets (as flat-buffer models do)
        flat = torch.zeros(2 * 16 * 16)
        model.body.weight = torch.nn.Parameter(flat[: 16 * 16].view(16, 16))
        model.extra = torch.nn.Linear(16, 16, bias=False)
        model.extra.weight = torch.nn.Parameter(flat[16 * 16 :].view(16, 16))
        torch.nn.init.normal_(flat)
    elif kind == "view-of-buffer":  # a buffer that is a view of another one
        model.register_buffer("stats", torch.arange(12.0).reshape(3, 4))
        model.register_buffer("first_row", model.stats[0])
    files = {}
    for mode in ("sync", "async"):
        ck = ckptio.Checkpointer(str(tmp_path / mode), MLPArch(hidden=16, tied=kind == "tied"))
        ck.save(model, 1, async_=mode == "async")
        ck.close()
        files[mode] = ckptio.latest(str(tmp_path / mode)).uri
    headers, sizes = [], []
    for mode in ("sync", "async"):
        with open(files[mode], "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            headers.append(read_header(f, size, files[mode]))
        sizes.append(size)
    sync, background = headers
    assert sizes[0] == sizes[1]
    assert sync.entries == background.entries  # names, dtypes, shapes, offsets
    ignored = {"ckptio.save_id", "ckptio.crc32", "ckptio.saved_in"}  # saved in two directories
    assert {k: v for k, v in sync.metadata.items() if k not in ignored} == {
        k: v for k, v in background.metadata.items() if k not in ignored
    }
    if kind == "tied":
        assert json.loads(sync.metadata["ckptio.aliases"]) == {"tied_out.weight": "body.weight"}
    a, b = (ckptio.load_from_uri(files[m]).state_dict for m in ("sync", "async"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_state_is_read_back_as_the_nested_structure_it_was_saved_as(tmp_path, env_meta):
    from archs import MLPArch

    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16))
    model = ck.load_or_create_policy(env_meta)
    opt = _adam_state(model)
    ck.save(model, 1, trainer_state={"step": 12, "sched": {"last": [1, 2]}}, optimizer=opt)
    tree = ckptio.CheckpointManager(str(tmp_path / "run")).load_trainer_state()
    assert tree["user"] == {"step": 12, "sched": {"last": [1, 2]}} and tree["epoch"] == 1
    assert torch.equal(tree["optimizer"]["state"]["head.weight"]["exp_avg"], opt.state[model.head.weight]["exp_avg"])
    assert len(tree["rng"]) == 1 and set(tree["rng"][0]) >= {"torch", "python", "numpy"}


def _checkpoint_wrapped(policy):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    policy.body = checkpoint_wrapper(policy.body)  # activation checkpointing puts a wrapper module in the names
    return policy


def test_wrapped_models_save_and_restore_under_the_unwrapped_names(tmp_path, env_meta):
    """Weights and optimizer state of an activation-checkpointed model are keyed as the plain model has them."""
    from archs import MLPArch

    torch.manual_seed(0)
    wrapped = _checkpoint_wrapped(MLPArch().make_policy(env_meta))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())  # the premise
    opt = _adam_state(wrapped)
    with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()) as ckpt:
        ckpt.save(wrapped, 1, optimizer=opt, force=True)
    plain = MLPArch().make_policy(env_meta)
    saved = ckptio.load_from_uri(str(tmp_path / "run")).state_dict
    assert set(saved) == set(plain.state_dict())
    for target in (plain, _checkpoint_wrapped(MLPArch().make_policy(env_meta))):
        target_opt = torch.optim.Adam(target.parameters(), lr=1e-3)
        with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()) as ckpt:
            assert ckpt.load_into(target, target_opt)
        for (name, p), q in zip(target.named_parameters(), wrapped.parameters(), strict=True):
            assert torch.equal(p, q), name
            assert torch.equal(target_opt.state[p]["exp_avg"], opt.state[q]["exp_avg"]), name


def test_saving_a_never_stepped_optimizer_leaves_it_untouched(tmp_path, policy):
    """torch's optimizer state-dict API would take an lr=0 step to create state: a save must not."""
    from archs import MLPArch

    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    hooks = []
    opt.register_step_pre_hook(lambda *a: hooks.append(a))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()) as ckpt:
        ckpt.save(policy, 1, optimizer=opt, force=True)
    assert not opt.state and not hooks
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_a_background_save_writes_the_metrics_as_they_were_at_save(tmp_path, policy, monkeypatch):
    """The caller may change its metrics dict once save() returned; the background writer holds its own copy."""
    from archs import MLPArch

    from ckptio.manager import CheckpointManager

    release = threading.Event()
    original = CheckpointManager.save_checkpoint

    def held(self, *args, **kwargs):
        release.wait(60)  # the writer thread starts only once the caller has changed its dict
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save_checkpoint", held)
    metrics = {"score": 1.0, "history": [1.0]}
    with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()) as ckpt:
        ckpt.save(policy, 1, metrics, force=True, async_=True)
        metrics["score"] = 2.0
        metrics["history"].append(2.0)
        release.set()
        ckpt.wait()
    assert ckptio.load_from_uri(str(tmp_path / "run")).training_metrics == {"score": 1.0, "history": [1.0]}


def test_a_background_save_after_a_dtype_change_keeps_the_new_dtype(tmp_path):
    """Snapshot buffers are reused between saves only while shape and dtype stay the same."""
    from archs import MLPArch

    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()) as ckpt:
        ckpt.save({"x": third.float()}, 1, force=True, async_=True)
        ckpt.save({"x": third}, 2, force=True, async_=True)
        ckpt.wait()
    loaded = ckptio.load_from_uri(str(tmp_path / "run")).state_dict["x"]
    assert loaded.dtype == torch.float64 and torch.equal(loaded, third)


def test_a_run_refuses_another_architecture(tmp_path, policy, env_meta):
    """The manifest is write-once: a job with another architecture neither saves into the run nor resumes it."""
    from archs import MLPArch

    run = str(tmp_path / "run")
    with ckptio.Checkpointer(run, MLPArch(hidden=16)) as ckpt:
        ckpt.save(policy, 1, force=True)
    with ckptio.Checkpointer(run, MLPArch(hidden=8)) as other:
        with pytest.raises(ckptio.ArchitectureError, match="refusing to resume into a different model"):
            other.save(policy, 2, force=True)
        with pytest.raises(ckptio.ArchitectureError, match="different model"):
            other.load_or_create_policy(env_meta)
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [1]


def test_together_runs_a_step_only_where_asked():
    """ranks.together: the node's first rank downloads, the others only learn whether it failed."""
    from ckptio import ranks

    calls = []
    assert ranks.together(lambda: calls.append(1) or "mine") == "mine"
    assert ranks.together(lambda: calls.append(2) or "theirs", here=False) is None
    assert calls == [1]
    with pytest.raises(ckptio.StorageError):
        ranks.together(lambda: (_ for _ in ()).throw(ckptio.StorageError("s3://b/x: download failed")))


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_retention_runs_after_save_returns_and_its_failure_raises_at_the_next_call(
    tmp_path, policy, monkeypatch, async_
):
    """Deleting a large checkpoint can take as long as writing one: save() returns first, and what retention
    does is finished (or raised, typed) by wait(), the next save or close(); the new checkpoint is never lost."""
    import errno

    from archs import MLPArch

    from ckptio.storage import Storage

    run = tmp_path / "run"
    ckpt = ckptio.Checkpointer(str(run), MLPArch(), ckptio.CheckpointConfig(keep_last=1))
    first = ckpt.save(policy, 1, force=True)
    ckpt.wait()
    release, deleting = threading.Event(), threading.Event()
    original = Storage.delete

    def held(self, name, missing_ok=True):
        deleting.set()
        assert release.wait(60), "retention was never released"
        return original(self, name, missing_ok)

    monkeypatch.setattr(Storage, "delete", held)
    returned = threading.Event()
    saver = threading.Thread(target=lambda: (ckpt.save(policy, 2, force=True, async_=async_), returned.set()))
    saver.start()
    assert deleting.wait(60), "retention never started"
    assert returned.wait(30), "save() waited for retention"
    assert [i.epoch for i in ckptio.list_checkpoints(str(run))] == [1, 2]  # the old one not yet deleted
    release.set()
    saver.join()
    ckpt.wait()
    assert [i.uri for i in ckptio.list_checkpoints(str(run))] == [ckpt.latest_uri()]
    assert ckpt.latest_uri() != first

    def failing(self, name, missing_ok=True):
        raise OSError(errno.EIO, "injected", name)

    monkeypatch.setattr(Storage, "delete", failing)
    ckpt.save(policy, 3, force=True, async_=async_)  # returns: its retention fails afterwards
    with pytest.raises(ckptio.CheckpointSaveError, match="applying retention") as raised:
        ckpt.wait()
    assert raised.value.errno == errno.EIO
    assert [i.epoch for i in ckptio.list_checkpoints(str(run))] == [2, 3]
    assert ckptio.load_from_uri(str(run)).epoch == 3
    monkeypatch.setattr(Storage, "delete", original)
    ckpt.save(policy, 4, force=True)  # the next save's retention catches up
    ckpt.close()
    assert [i.epoch for i in ckptio.list_checkpoints(str(run))] == [4]


def test_a_partial_save_names_what_it_keeps_and_strict_false_loads_any_overlap(tmp_path, policy):
    from archs import ENV, MLPArch

    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch())
    with pytest.raises(ckptio.InvalidArgumentError, match="'nope', which the state dict does not have"):
        ck.save(policy, 1, only=["head.weight", "nope"])
    with pytest.raises(ckptio.InvalidArgumentError, match="needs the module"):
        ck.save(policy.state_dict(), 1, only="trainable")
    extra = {**policy.state_dict(), "adapter.weight": torch.ones(2)}  # a tensor the model lacks
    ck.save(extra, 1)
    ck.close()
    torch.manual_seed(1)
    other = MLPArch().make_policy(ENV)
    again = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch())
    with pytest.raises(ckptio.StateDictMismatchError, match=r"not in model: adapter\.weight"):
        again.load_into(other)
    assert again.load_into(other, strict=False)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in other.state_dict().items())
    again.close()


class _FusedQKV(torch.nn.Module):
    """One fused parameter saved as three (as torchtitan's FusedQKVLinear is): its hooks rename what it saves."""

    def __init__(self):
        super().__init__()
        self.wqkv = torch.nn.Linear(4, 12)
        self.register_state_dict_post_hook(self._split)
        self.register_load_state_dict_pre_hook(self._merge)

    def forward(self, x):
        return self.wqkv(x)

    @staticmethod
    def _split(module, state, prefix, local_metadata):
        for param in ("weight", "bias"):
            parts = state.pop(f"{prefix}wqkv.{param}").chunk(3)
            state.update({f"{prefix}{n}.{param}": p.clone() for n, p in zip(("wq", "wk", "wv"), parts, strict=True)})

    @staticmethod
    def _merge(module, state, prefix, *args):
        for param in ("weight", "bias"):
            state[f"{prefix}wqkv.{param}"] = torch.cat([state.pop(f"{prefix}{n}.{param}") for n in ("wq", "wk", "wv")])


def test_a_model_whose_hooks_rename_its_state_saves_and_loads_into(tmp_path, env_meta):
    from archs import MLPArch

    torch.manual_seed(0)
    saved = torch.nn.Sequential(_FusedQKV(), torch.nn.Linear(12, 2))
    opt = torch.optim.Adam(saved.parameters())
    saved(torch.randn(3, 4)).sum().backward()
    opt.step()
    with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()) as ckpt:
        ckpt.save(saved, epoch=0, optimizer=opt)
    assert {"0.wq.weight", "0.wv.bias"} <= set(ckptio.load_from_uri(str(tmp_path / "run")).state_dict)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(_FusedQKV(), torch.nn.Linear(12, 2))
    fresh_opt = torch.optim.Adam(fresh.parameters())
    with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()) as ckpt:
        assert ckpt.load_into(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), fresh.parameters(), strict=True))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
