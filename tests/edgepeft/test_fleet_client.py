"""The fleet's device side: `Trainer.load_trainable`, and the ClientApp running with torch unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_runtime import Trainer
from device_runtime.errors import CheckpointError
from edgepeft.fleet.client_app import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_record, make_client_app
from edgepeft.fleet.partition import PartitionConfig, partition_digits

from ..import_blocker import blocking_prelude
from .fleet_support import LoopbackGrid, fleet_bundle  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return partition_digits(PartitionConfig(num_clients=12, seed=0)).write(tmp_path_factory.mktemp("clients"))


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((16, 64), dtype=np.float32), "labels": rng.integers(0, 10, 16).astype(np.int64)}


def test_load_trainable_with_reset_is_a_fresh_optimizer(fleet_bundle: Path) -> None:
    moved = Trainer.open(fleet_bundle, threads=1)
    for i in range(3):
        moved.step(_batch(i))
    tensors = moved.trainable_state()
    moved.load_trainable(tensors, reset_optimizer=True)
    assert moved.step_count == 0 and all(not v.any() for v in moved.optimizer_state().values())
    # A trainer that starts from the same tensors with a new optimizer must take exactly the same steps.
    fresh = Trainer.open(fleet_bundle, threads=1)
    fresh.load_trainable(tensors, reset_optimizer=True)
    for i in range(3, 6):
        assert moved.step(_batch(i)) == fresh.step(_batch(i))
    for name, value in moved.trainable_state().items():
        np.testing.assert_array_equal(value, fresh.trainable_state()[name])


def test_load_trainable_can_keep_the_optimizer(fleet_bundle: Path) -> None:
    trainer = Trainer.open(fleet_bundle, threads=1)
    trainer.step(_batch())
    state, tensors = trainer.optimizer_state(), trainer.trainable_state()
    shifted = {n: v + np.float32(0.5) for n, v in tensors.items()}
    trainer.load_trainable(shifted, reset_optimizer=False)
    assert trainer.step_count == 1
    for name, value in trainer.optimizer_state().items():
        np.testing.assert_array_equal(value, state[name])
    shifted["head.bias"][:] = 9.0  # the trainer holds a copy, not the caller's array
    assert not np.any(trainer.trainable_state()["head.bias"] == 9.0)


@pytest.mark.parametrize("damage", ["missing", "extra", "shape", "dtype", "nan"])
def test_load_trainable_refuses_bad_tensors_and_changes_nothing(fleet_bundle: Path, damage: str) -> None:
    trainer = Trainer.open(fleet_bundle, threads=1)
    trainer.step(_batch())
    before, state = trainer.trainable_state(), trainer.optimizer_state()
    bad = dict(before)
    if damage == "missing":
        del bad["head.bias"]
    elif damage == "extra":
        bad["head.weight"] = np.zeros((10, 128), np.float32)  # the frozen base never travels back in
    elif damage == "shape":
        bad["head.bias"] = np.zeros(11, np.float32)
    elif damage == "dtype":
        bad["head.bias"] = bad["head.bias"].astype(np.float64)
    else:
        bad["head.bias"] = np.full(10, np.nan, np.float32)
    with pytest.raises(CheckpointError, match="load_trainable"):
        trainer.load_trainable(bad, reset_optimizer=True)
    assert trainer.step_count == 1
    for name, value in trainer.trainable_state().items():
        np.testing.assert_array_equal(value, before[name])
    for name, value in trainer.optimizer_state().items():
        np.testing.assert_array_equal(value, state[name])
    with pytest.raises(TypeError):
        trainer.load_trainable(before)  # type: ignore[call-arg]  # the optimizer choice is never implicit


def _train_message(tensors: dict[str, np.ndarray], mu: float = 0.0, steps: int = 20):  # noqa: ANN202
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    config = ConfigRecord({"local-steps": steps, "batch-size": 16, "lr": 1e-2, "proximal-mu": mu, "seed": 3,
                           "server-round": 1})
    return Message(RecordDict({ARRAYS_KEY: arrays_to_record(tensors), CONFIG_KEY: config}), dst_node_id=1000,
                   message_type=MessageType.TRAIN)


def test_fedprox_pull_keeps_the_local_model_near_the_global_one(fleet_bundle: Path, fleet_dir: Path) -> None:
    from edgepeft.fleet.robust import update_norm

    start = Trainer.open(fleet_bundle).trainable_state()
    norms = {}
    for mu in (0.0, 5.0):
        grid = LoopbackGrid([make_client_app(fleet_bundle, fleet_dir)])
        (reply,) = grid.send_and_receive([_train_message(start, mu)])
        returned = {n: a.numpy() for n, a in reply.content[ARRAYS_KEY].items()}
        norms[mu] = update_norm({n: returned[n].astype(np.float64) - start[n] for n in start})
        assert reply.content[METRICS_KEY]["steps"] == 20
    # mu=5 with lr=1e-2 pulls 5% of the drift back each step: the round's update must come out clearly smaller
    assert norms[5.0] < 0.75 * norms[0.0], norms


CLIENT_SCRIPT = blocking_prelude("a fleet client") + r"""
repo, bundle, data_dir, out = sys.argv[1:5]
sys.path.insert(0, repo)
spec = importlib.util.spec_from_file_location("fleet_client", repo + "/edgepeft/fleet/client_app.py")
client = importlib.util.module_from_spec(spec)
sys.modules["fleet_client"] = client  # dataclasses look their module up while the class is built
spec.loader.exec_module(client)

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from device_runtime import Trainer

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
start = Trainer.open(bundle).trainable_state()
node_config = {"bundle-dir": bundle, "data-path": data_dir + "/client-003/train.npz",
               "eval-data-path": data_dir + "/client-003/test.npz", "personal-adapter-dir": out + "/personal",
               "client-id": 3}
context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
config = {"local-steps": 25, "batch-size": 16, "lr": 1e-2, "proximal-mu": 0.0, "seed": 1, "server-round": 1}
def message(kind, extra):
    content = RecordDict({"arrays": client.arrays_to_record(start), "config": ConfigRecord({**config, **extra})})
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m-" + kind
    return msg
app = client.app  # the module-level app a SuperNode loads: everything from the node config
train = app(message(MessageType.TRAIN, {}), context)
evaluate = app(message(MessageType.EVALUATE, {"personalize-steps": 40}), context)
returned = {n: a.numpy() for n, a in train.content["arrays"].items()}
print(json.dumps({
    "names": sorted(returned), "shapes": {n: list(a.shape) for n, a in returned.items()},
    "moved": float(sum(np.abs(returned[n] - start[n]).sum() for n in start)),
    "train_metrics": dict(train.content["metrics"]), "eval_metrics": dict(evaluate.content["metrics"]),
    "eval_arrays": list(evaluate.content.array_records), "state": list(context.state.array_records),
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED), "attempts": attempts}))
"""


def test_client_app_runs_where_torch_cannot_be_imported(fleet_bundle: Path, fleet_dir: Path,
                                                        tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, str(REPO), str(fleet_bundle), str(fleet_dir),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["train_metrics"]["torch-loaded"] == 0
    manifest = json.loads((fleet_bundle / "manifest.json").read_text())
    assert out["shapes"] == {t["name"]: t["shape"] for t in manifest["trainable"]}  # the adapter, nothing else
    assert out["moved"] > 0 and out["train_metrics"]["steps"] == 25
    assert out["train_metrics"]["num-examples"] == 40 and out["train_metrics"]["client-id"] == 3
    metrics = out["eval_metrics"]
    assert metrics["num-examples"] == 26 and metrics["personal-steps"] == 40
    assert metrics["personal-accuracy"] > metrics["accuracy"] + 0.2  # the base reads this user's style badly
    assert out["eval_arrays"] == [] and out["state"] == ["personal-adapter"]  # the personal adapter stays home
    assert (tmp_path / "personal" / "adapter.safetensors").is_file()
