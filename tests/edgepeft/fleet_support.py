"""Shared pieces of the fleet tests: one exported digits bundle per session, and a loopback Grid.

`LoopbackGrid` is a test double of Flower's Grid: it hands each message to a ClientApp object in this process
and returns its reply, so the strategy, the ClientApp and Flower's Message/ArrayRecord code run as in the
simulation engine, minus Ray's process hops (seconds per run that the unit tests do not need). Every message,
both ways, is deflated into Flower's serialized objects and rebuilt from those bytes alone, as a SuperLink
stores and forwards it; `wire` records how many bytes that was.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

if TYPE_CHECKING:
    from edgepeft.fleet.server_app import AdapterStrategy, FleetConfig

_EXPORTS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def fleet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported once per session however many modules import this fixture; read-only."""
    if "bundle" not in _EXPORTS:
        from edgepeft.fleet.simulate import export_digits_base

        # The built-in mlp pretrained on the base writers, LoRA r=4 (fc1, fc2) + BitFit, AdamW.
        _EXPORTS["bundle"] = export_digits_base(tmp_path_factory.mktemp("fleet") / "bundle")
    return _EXPORTS["bundle"]


class LoopbackGrid(Grid):
    """Nodes are (ClientApp, Context) pairs in this process; send_and_receive calls them one after another."""

    def __init__(self, apps: list[ClientApp], node_configs: Optional[list[dict]] = None) -> None:
        self.nodes = {}
        for i, app in enumerate(apps):
            node_config = {"partition-id": i, "num-partitions": len(apps), **((node_configs or [{}] * len(apps))[i])}
            self.nodes[1000 + i] = (app, Context(run_id=1, node_id=1000 + i, node_config=node_config,
                                                 state=RecordDict(), run_config={}))
        self.sent: list[Message] = []
        self.wire: list[tuple[str, int, int]] = []  # (message type or "reply", destination/source node, bytes)
        # Flower stamps new messages with the identity of the running task; the simulation engine sets it too.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    def set_run(self, run) -> None:  # noqa: ANN001
        pass

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    @staticmethod
    def over_the_wire(message: Message) -> tuple[Message, int]:
        """The message rebuilt from its serialized objects only, and how many bytes those were."""
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
        size = sum(len(c) for c in contents.values())
        return inflate_object_from_contents(message.object_id, contents), size

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            message.metadata.__dict__["_run_id"] = 1
            self.sent.append(message)
            node = message.metadata.dst_node_id
            received, size = self.over_the_wire(message)
            self.wire.append((message.metadata.message_type, node, size))
            app, context = self.nodes[node]
            reply = app(received, context)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply.metadata.__dict__["_src_node_id"] = node
            returned, size = self.over_the_wire(reply)
            self.wire.append(("reply", node, size))
            replies.append(returned)
        return replies


def run_loopback(bundle: Path, apps: list[ClientApp], config: "FleetConfig",
                 client_ids: Optional[list[int]] = None) -> tuple["AdapterStrategy", LoopbackGrid]:
    """One federated run of the real ServerApp over a LoopbackGrid; returns its strategy (history, final) and grid."""
    from device_runtime import read_bundle
    from edgepeft.fleet.server_app import AdapterStrategy, make_server_app

    ids = client_ids if client_ids is not None else list(range(len(apps)))
    grid = LoopbackGrid(apps, [{"partition-id": i} for i in ids])
    strategy = AdapterStrategy(read_bundle(bundle).trainable, config)
    server = make_server_app(config, bundle, strategy=strategy)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return strategy, grid
